//! New weights without new sessions: [`WeightReceiver`] for [`OnnxModel`].
//!
//! A model loaded with weights from memory ([`OnnxModel::load_with_weights`]) hands ONNX Runtime
//! its parameters as initializers whose buffers it keeps; ONNX Runtime reads a CPU initializer
//! given this way where it lies instead of copying it, and with weight pre-packing off it keeps
//! no transformed copy either. Writing the next version into those buffers, while no session
//! runs, is then all a weight update takes: no graph is parsed, no session initialised, nothing
//! read from disk. On a GPU the sessions hold device copies, so there the sessions are rebuilt.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::weights::{WeightReceiver, WeightUpdate};

use super::error::{OnnxError, OnnxResult};
use super::model::{
    InPlaceWeights, InitializerBuffer, NO_VERSION, OnnxModel, build_sessions, lock,
};
use super::provider::Placement;
use super::weights::{MapEntry, fill_initializer_rows, mapped_param, row_len};

impl WeightReceiver for OnnxModel {
    fn receive_weights(&self, update: &WeightUpdate<'_>) -> crate::Result<()> {
        Ok(self.take_weights(update)?)
    }

    fn weights_version(&self) -> Option<u64> {
        match self.version.load(Ordering::Acquire) {
            NO_VERSION => None,
            v => Some(v),
        }
    }
}

/// Values one piece of a weight write holds at most (16 Mi, 64 MiB): large initializers (the
/// output head is 311 M values at the 3B widths) are cut into pieces of whole rows, so that the
/// writers share them instead of one thread writing the largest alone.
const PIECE: usize = 1 << 24;

/// Rows `rows` of one initializer, written by one thread.
struct Piece<'a> {
    entry: &'a MapEntry,
    buffer: &'a InitializerBuffer,
    rows: Range<usize>,
}

/// Lets `write` overwrite rows `rows` (of `width` values each) of an initializer's buffer. Only
/// called while every session of the model is locked.
#[allow(unsafe_code)]
fn overwrite(
    buffer: &InitializerBuffer,
    rows: &Range<usize>,
    width: usize,
    write: impl FnOnce(&mut [f32]) -> OnnxResult<()>,
) -> OnnxResult<()> {
    let (start, len) = (rows.start * width, rows.len() * width);
    assert!(
        start + len <= buffer.len,
        "rows {rows:?} of {width} outside the buffer"
    );
    let data = std::ptr::with_exposed_provenance_mut::<f32>(buffer.address);
    // SAFETY: `address` is the data of a CPU tensor of exactly `len` `f32`s that `load_session`
    // created from an owned vector; the tensor (kept alive by the buffer's `Arc`) owns it, and no
    // Rust reference to its elements exists anywhere else. ONNX Runtime reads it only while a
    // session runs, and the caller holds every session's lock; the range is inside the buffer
    // (checked above) and each range is written by one thread only (`write_all` cuts disjoint
    // pieces); so nothing else reads or writes these elements while `write` runs.
    write(unsafe { std::slice::from_raw_parts_mut(data.add(start), len) })
}

/// The pieces of every initializer: whole rows, at most [`PIECE`] values each (one row at
/// least).
fn pieces(in_place: &InPlaceWeights) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    for (entry, buffer) in in_place.buffers.iter().flatten() {
        let total = entry.shape.first().copied().unwrap_or(1);
        let per_piece = (PIECE / row_len(entry).max(1)).max(1);
        for start in (0..total).step_by(per_piece) {
            out.push(Piece {
                entry,
                buffer,
                rows: start..(start + per_piece).min(total),
            });
        }
    }
    out
}

/// Writes every mapped parameter of `update` into its buffer, on a few threads: the pieces
/// ([`pieces`]), the largest dealt out first, round robin, so the threads copy about as much
/// each. Only called while every session of the model is locked.
fn write_all(in_place: &InPlaceWeights, update: &WeightUpdate<'_>) -> OnnxResult<()> {
    let writers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut jobs = pieces(in_place);
    jobs.sort_by_key(|p| std::cmp::Reverse(p.rows.len() * row_len(p.entry)));
    let mut shares: Vec<Vec<Piece<'_>>> = (0..writers).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        shares[i % writers].push(job);
    }
    std::thread::scope(|scope| {
        let running: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    share.into_iter().try_for_each(|p| {
                        let width = row_len(p.entry);
                        overwrite(p.buffer, &p.rows, width, |out| {
                            fill_initializer_rows(
                                p.entry,
                                update.tensors,
                                &in_place.map_path,
                                p.rows.clone(),
                                out,
                            )
                        })
                    })
                })
            })
            .collect();
        running
            .into_iter()
            .try_for_each(|writer| writer.join().expect("a weight writer panicked"))
    })
}

impl OnnxModel {
    /// [`WeightReceiver::receive_weights`]: checks every mapped parameter of `update` first (a
    /// bad update changes nothing), then writes them into the sessions' buffers.
    fn take_weights(&self, update: &WeightUpdate<'_>) -> OnnxResult<()> {
        let Some(in_place) = &self.in_place else {
            return Err(OnnxError::Bundle {
                path: self.dir.clone(),
                reason: "this model runs the weights it was loaded with; load it with \
                         OnnxModel::load_with_weights to take new ones"
                    .into(),
            });
        };
        let started = Instant::now();
        for (entry, _) in in_place.buffers.iter().flatten() {
            mapped_param(entry, update.tensors, &in_place.map_path)?;
        }
        // No generation may read the buffers while they change: hold every session.
        let mut vision = lock(&self.vision);
        let mut embed = lock(&self.embed);
        let mut decoder = lock(&self.decoder);
        if self.device.gpu {
            let mut place = Placement::new(&self.options);
            let [(v, _), (e, _), (d, _)] = build_sessions(
                &self.runtime,
                &self.dir,
                &self.config,
                &self.options,
                &mut place,
                Some((update.tensors, &in_place.map)),
                true,
            )?;
            (*vision, *embed, *decoder) = (v, e, d);
        } else {
            self.version.store(NO_VERSION, Ordering::Release);
            write_all(in_place, update)?;
        }
        // Image features of the old weights must not be served for the new ones.
        lock(&self.cache).clear();
        self.version.store(update.version, Ordering::Release);
        tracing::debug!(
            version = update.version,
            seconds = started.elapsed().as_secs_f64(),
            rebuilt = self.device.gpu,
            "rollout engine took new weights"
        );
        Ok(())
    }
}
