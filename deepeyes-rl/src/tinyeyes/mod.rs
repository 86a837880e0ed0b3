//! TinyEyes: the embedded default model, a Qwen2.5-VL small enough to train on two CPU cores,
//! and the pieces that build it: its own tokenizer ([`tokenizer`]), its architecture and
//! conversation format ([`format`]), and its initial checkpoint ([`init`]).

pub mod base;
pub mod format;
pub mod init;
pub mod tokenizer;

pub use base::{BaseEval, BaseStage, BaseStageConfig, BaseStep};
pub use format::{TinyEyesFormat, tinyeyes_model_config};
pub use init::init_checkpoint;
pub use tokenizer::{PROTOCOL_SPECIAL_TOKENS, TokenizerTraining, train_tokenizer};
