//! Integration tests of deepeyes-reward (one binary).

mod golden;
mod judge;
mod pipeline;
mod props;
mod server;
