//! Generation's lower level on [`OnnxModel`]: the KV cache of rows decoded together
//! ([`DecodeState`]), the embedding and decoder graphs, prefill with logits ([`LogitsOf`]),
//! single decode steps, and copying cache rows.

use std::borrow::Cow;
use std::time::Instant;

use ort::session::SessionInputValue;
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, TensorRef};

use super::batch::{self, Layout, Row};
use super::error::{OnnxError, OnnxResult};
use super::model::{OnnxModel, lock, run_err};
use super::prompt::PreparedPrompt;

/// Which prefill positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsOf {
    /// Only each row's last token (what generation needs).
    Last,
    /// Every token of each row (for scoring and parity tests).
    All,
}

/// The KV cache and padding layout of rows being decoded together.
#[derive(Debug)]
pub struct DecodeState {
    values: Vec<DynValue>,
    len: usize,
    offsets: Vec<usize>,
    deltas: Vec<i64>,
}

impl DecodeState {
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.offsets.len()
    }

    /// Cached positions (padded prompt plus decoded steps).
    pub fn cache_len(&self) -> usize {
        self.len
    }
}

impl OnnxModel {
    fn empty_cache(&self, batch: usize) -> OnnxResult<Vec<DynValue>> {
        let t = &self.config.text;
        let session = lock(&self.decoder);
        let shape = [batch as i64, t.num_kv_heads as i64, 0, t.head_dim as i64];
        (0..2 * t.num_layers)
            .map(|_| {
                DynTensor::new(session.allocator(), self.kv_type, shape)
                    .map(DynValue::from)
                    .map_err(run_err("decoder"))
            })
            .collect()
    }

    fn embed(&self, ids: &[i64], batch: usize, seq: usize) -> OnnxResult<Vec<f32>> {
        let err = run_err("embed");
        let mut session = lock(&self.embed);
        let outputs = session
            .run(vec![(
                Cow::from("input_ids"),
                SessionInputValue::from(
                    TensorRef::from_array_view(([batch, seq], ids)).map_err(&err)?,
                ),
            )])
            .map_err(&err)?;
        let (_, data) = outputs["inputs_embeds"]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        let hidden = self.config.text.hidden_size;
        if data.len() != batch * seq * hidden {
            return Err(OnnxError::Run {
                graph: "embed",
                message: format!(
                    "inputs_embeds holds {} numbers, expected {batch}×{seq}×{hidden}",
                    data.len()
                ),
            });
        }
        Ok(data.to_vec())
    }

    /// One decoder call: `seq` new positions per row after the cached ones. Returns the logits
    /// `[batch, keep, vocab]` and replaces the cache with the presents.
    fn decode(
        &self,
        state: &mut DecodeState,
        embeds: Vec<f32>,
        positions: Vec<i64>,
        bias: Vec<f32>,
        keep: Vec<i64>,
        seq: usize,
    ) -> OnnxResult<Vec<f32>> {
        let b = state.batch();
        let hidden = self.config.text.hidden_size;
        let total = state.len + seq;
        let k = keep.len() / b;
        let err = run_err("decoder");
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(4 + state.values.len());
        inputs.push((
            "inputs_embeds".into(),
            Tensor::from_array(([b, seq, hidden], embeds))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "position_ids".into(),
            Tensor::from_array(([3, b, seq], positions))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "attn_bias".into(),
            Tensor::from_array(([b, 1, seq, total], bias))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "logits_positions".into(),
            Tensor::from_array(([b, k], keep)).map_err(&err)?.into(),
        ));
        for (name, value) in self.past_names.iter().zip(&state.values) {
            inputs.push((name.as_str().into(), value.into()));
        }
        let mut session = lock(&self.decoder);
        let mut outputs = session.run(inputs).map_err(&err)?;
        let logits = {
            let (shape, data) = outputs["logits"]
                .try_extract_tensor::<f32>()
                .map_err(&err)?;
            let vocab = self.config.text.vocab_size;
            if shape.len() != 3
                || shape[0] as usize != b
                || shape[1] as usize != k
                || shape[2] as usize != vocab
            {
                return Err(OnnxError::Run {
                    graph: "decoder",
                    message: format!("logits have shape {shape:?}, expected [{b}, {k}, {vocab}]"),
                });
            }
            data.to_vec()
        };
        let mut presents = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            presents.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| OnnxError::Run {
                        graph: "decoder",
                        message: format!("no output named {name}"),
                    })?,
            );
        }
        drop(outputs);
        drop(session);
        state.values = presents;
        state.len = total;
        Ok(logits)
    }

    /// Runs the prompts through the decoder together (left-padded, in chunks of
    /// `prefill-chunk` positions). Returns each row's logits (`[vocab]` for
    /// [`LogitsOf::Last`], `[len, vocab]` row-major for [`LogitsOf::All`]) and the state to
    /// decode from.
    pub fn prefill(
        &self,
        prompts: &[&PreparedPrompt],
        which: LogitsOf,
    ) -> OnnxResult<(Vec<Vec<f32>>, DecodeState)> {
        if prompts.is_empty() {
            return Err(crate::Error::Model("prefill of an empty batch".into()).into());
        }
        if prompts.iter().any(|p| p.input_ids.is_empty()) {
            return Err(crate::Error::Model("cannot prefill an empty context".into()).into());
        }
        let started = Instant::now();
        let rows: Vec<Row<'_>> = prompts
            .iter()
            .map(|p| Row {
                ids: &p.input_ids,
                rope: &p.rope,
            })
            .collect();
        let layout = Layout::of(&rows);
        let b = rows.len();
        let hidden = self.config.text.hidden_size;
        let vocab = self.config.text.vocab_size;
        let pad = self.config.tokens.image_pad;
        let mut state = DecodeState {
            values: self.empty_cache(b)?,
            len: 0,
            offsets: layout.offsets.clone(),
            deltas: prompts.iter().map(|p| p.rope.delta).collect(),
        };
        // Where each row's image features go: the k-th image pad takes feature row k.
        let pad_positions: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                p.input_ids
                    .iter()
                    .enumerate()
                    .filter(|&(_, &t)| t == pad)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        for (p, positions) in prompts.iter().zip(&pad_positions) {
            if positions.len() * hidden != p.features.len() {
                return Err(crate::Error::Model(format!(
                    "{} image pads but {} feature rows",
                    positions.len(),
                    p.features.len() / hidden
                ))
                .into());
            }
        }
        let mut all: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut last = Vec::new();
        let chunk = self.options.prefill_chunk;
        let mut start = 0;
        while start < layout.len {
            let end = (start + chunk).min(layout.len);
            let seq = end - start;
            let ids = batch::chunk_ids(&rows, &layout, start, end, self.config.tokens.pad);
            let mut embeds = self.embed(&ids, b, seq)?;
            for r in 0..b {
                let off = layout.offsets[r];
                for (k, &pos) in pad_positions[r].iter().enumerate() {
                    let i = pos + off;
                    if i >= start && i < end {
                        let dst = (r * seq + (i - start)) * hidden;
                        embeds[dst..dst + hidden]
                            .copy_from_slice(&prompts[r].features[k * hidden..(k + 1) * hidden]);
                    }
                }
            }
            let positions = batch::chunk_positions(&rows, &layout, start, end);
            let bias = batch::chunk_bias(&layout.offsets, start, end);
            let is_last = end == layout.len;
            let keep: Vec<i64> = match which {
                LogitsOf::All => (0..b).flat_map(|_| 0..seq as i64).collect(),
                LogitsOf::Last => vec![seq as i64 - 1; b],
            };
            let k = keep.len() / b;
            let logits = self.decode(&mut state, embeds, positions, bias, keep, seq)?;
            match which {
                LogitsOf::All => {
                    for (r, rows) in all.iter_mut().enumerate().take(b) {
                        let off = layout.offsets[r];
                        for j in 0..seq {
                            if start + j >= off {
                                let src = (r * k + j) * vocab;
                                rows.extend_from_slice(&logits[src..src + vocab]);
                            }
                        }
                    }
                }
                LogitsOf::Last if is_last => last = logits,
                LogitsOf::Last => {}
            }
            start = end;
        }
        let out = match which {
            LogitsOf::All => all,
            LogitsOf::Last => last.chunks(vocab).map(<[f32]>::to_vec).collect(),
        };
        tracing::debug!(
            batch = b,
            len = layout.len,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "prefill"
        );
        Ok((out, state))
    }

    /// Feeds one token per row and returns each row's next-token logits.
    pub fn step(&self, state: &mut DecodeState, tokens: &[u32]) -> OnnxResult<Vec<Vec<f32>>> {
        let b = state.batch();
        if tokens.len() != b {
            return Err(
                crate::Error::Model(format!("{} tokens for a batch of {b}", tokens.len())).into(),
            );
        }
        let vocab = self.config.text.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(crate::Error::Model(format!(
                "token {t} is outside the vocabulary of {vocab}"
            ))
            .into());
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let embeds = self.embed(&ids, b, 1)?;
        let index = state.len;
        let positions = batch::step_positions(&state.offsets, &state.deltas, index);
        let bias = batch::step_bias(&state.offsets, index);
        let logits = self.decode(state, embeds, positions, bias, vec![0; b], 1)?;
        Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// A state whose row `i` is a copy of row `rows[i]` of `state` (for decoding several samples
    /// of one prompt after a single prefill). Needs a `float32` cache.
    pub fn gather_rows(&self, state: &DecodeState, rows: &[usize]) -> OnnxResult<DecodeState> {
        if let Some(&r) = rows.iter().find(|&&r| r >= state.batch()) {
            return Err(
                crate::Error::Model(format!("row {r} of a batch of {}", state.batch())).into(),
            );
        }
        let err = run_err("decoder");
        let mut values = Vec::with_capacity(state.values.len());
        for v in &state.values {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(&err)?;
            let per_row: usize = shape[1..].iter().map(|&d| d as usize).product();
            let mut out = Vec::with_capacity(per_row * rows.len());
            for &r in rows {
                out.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut dims: Vec<i64> = shape.to_vec();
            dims[0] = rows.len() as i64;
            values.push(Tensor::from_array((dims, out)).map_err(&err)?.into_dyn());
        }
        Ok(DecodeState {
            values,
            len: state.len,
            offsets: rows.iter().map(|&r| state.offsets[r]).collect(),
            deltas: rows.iter().map(|&r| state.deltas[r]).collect(),
        })
    }

    /// Whether the KV cache is `float32` (what [`OnnxModel::gather_rows`] needs).
    pub fn cache_is_f32(&self) -> bool {
        self.kv_type == TensorElementType::Float32
    }
}
