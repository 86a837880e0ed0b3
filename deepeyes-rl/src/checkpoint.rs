//! Checkpoints: a folder per step, written atomically, holding named byte blobs (weights and
//! optimizer state, serialised by the engine), the training state (step, RNG states, data cursor)
//! and the config.
//!
//! A checkpoint is built in a hidden temporary folder next to its final place; every file is
//! fsynced, the manifest is written last, and one `rename` publishes it. A run killed at any
//! moment leaves either the complete checkpoint or none (plus a temporary folder the next writer
//! removes). Each blob's size and SHA-256 are in the manifest, so a damaged file is reported by
//! name instead of being loaded.
//!
//! ```
//! use deepeyes_rl::checkpoint::{Checkpoint, CheckpointWriter, TrainState};
//!
//! use std::io::Write as _;
//!
//! let root = tempfile::tempdir().unwrap();
//! let mut w = CheckpointWriter::begin(root.path(), 8).unwrap();
//! w.add_bytes("model.safetensors", b"weights").unwrap();
//! w.add_with("optimizer.bin", |out| out.write_all(b"moments")).unwrap();
//! let dir = w.commit(&TrainState::new(8), "steps = 80\n").unwrap();
//!
//! let ckpt = Checkpoint::open(&dir).unwrap();
//! assert_eq!(ckpt.state().step, 8);
//! assert_eq!(ckpt.read_blob("optimizer.bin").unwrap(), b"moments");
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use deepeyes_core::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The manifest's file name inside a checkpoint.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The config's file name inside a checkpoint.
pub const CONFIG_FILE: &str = "config.toml";
/// The manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const STEP_PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";
const OLD_PREFIX: &str = ".old-";

/// Where the data stream stands: the next item to read is `order[position]` of epoch `epoch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCursor {
    /// Passes over the dataset completed.
    pub epoch: u64,
    /// Items consumed in the current pass.
    pub position: u64,
}

/// Everything besides the blobs that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// RL steps completed.
    pub step: u64,
    /// Named random generator states (`data`, `rollout`, …).
    #[serde(default)]
    pub rngs: BTreeMap<String, Rng>,
    /// The data stream position.
    #[serde(default)]
    pub data_cursor: DataCursor,
    /// Anything else the trainer keeps (e.g. the tool-collapse detector).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl TrainState {
    /// A state at `step` with no RNGs, cursor at the start, nothing extra.
    pub fn new(step: u64) -> Self {
        Self {
            step,
            rngs: BTreeMap::new(),
            data_cursor: DataCursor::default(),
            extra: serde_json::Value::Null,
        }
    }
}

/// One stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobEntry {
    /// File name inside the checkpoint.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

/// The `manifest.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] at write time.
    pub format_version: u32,
    /// The training state.
    pub state: TrainState,
    /// The blobs, in the order they were added.
    pub blobs: Vec<BlobEntry>,
    /// SHA-256 of `config.toml`.
    pub config_sha256: String,
    /// Seconds since the Unix epoch when it was written.
    pub created_unix_s: u64,
}

/// The folder name of the checkpoint of `step`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn check_blob_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name != MANIFEST_FILE
        && name != CONFIG_FILE;
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "blob name",
            format!(
                "{name:?}: use letters, digits, '.', '_' or '-', not starting with '.', and not \
                 {MANIFEST_FILE} or {CONFIG_FILE}"
            ),
        ))
    }
}

/// Fsyncs a directory so a rename inside it is durable (a no-op where unsupported).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Size and lower-case hex SHA-256 of the file at `path`, read in 1 MiB pieces.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex(&hasher.finalize())))
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync of the folder.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?;
    let tmp = parent.join(format!(
        "{TMP_PREFIX}{}-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(parent)
}

/// Builds one checkpoint in a temporary folder; [`CheckpointWriter::commit`] publishes it.
/// Dropped without committing, it removes the temporary folder.
#[derive(Debug)]
pub struct CheckpointWriter {
    root: PathBuf,
    tmp: PathBuf,
    step: u64,
    blobs: Vec<BlobEntry>,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts the checkpoint of `step` under `root` (created if needed). Leftover temporary
    /// folders of killed writers are removed first.
    pub fn begin(root: &Path, step: u64) -> Result<Self> {
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        for entry in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() {
                continue;
            }
            // A `.old-` folder is a good checkpoint that a replacement of the same step moved
            // aside; if the kill came before the replacement took its place, it goes back.
            if let Some(original) = name
                .strip_prefix(OLD_PREFIX)
                .and_then(|rest| rest.rsplit_once('-'))
                .map(|(step_name, _pid)| root.join(step_name))
                && !original.exists()
            {
                tracing::info!(path = %original.display(), "restoring a checkpoint moved aside");
                fs::rename(entry.path(), &original).map_err(|e| Error::io(&original, e))?;
                continue;
            }
            if name.starts_with(TMP_PREFIX) || name.starts_with(OLD_PREFIX) {
                tracing::info!(path = %entry.path().display(), "removing an unfinished checkpoint");
                fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        let tmp = root.join(format!(
            "{TMP_PREFIX}{}-{}",
            checkpoint_dir_name(step),
            std::process::id()
        ));
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp,
            step,
            blobs: Vec::new(),
            committed: false,
        })
    }

    /// The temporary folder the checkpoint is built in, for producers that write their files
    /// themselves (then [`CheckpointWriter::adopt`] each).
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Records a file that a producer wrote into [`CheckpointWriter::dir`] as a blob: hashed,
    /// fsynced and listed in the manifest like [`CheckpointWriter::add_bytes`]' blobs.
    pub fn adopt(&mut self, name: &str) -> Result<()> {
        let path = self.new_blob_path(name)?;
        let (bytes, sha256) = hash_file(&path)?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        self.blobs.push(BlobEntry {
            name: name.to_string(),
            bytes,
            sha256,
        });
        Ok(())
    }

    /// Where blob `name` goes, once the name is checked to be usable and not yet taken.
    fn new_blob_path(&self, name: &str) -> Result<PathBuf> {
        check_blob_name(name)?;
        if self.blobs.iter().any(|b| b.name == name) {
            return Err(Error::invalid(
                "blob name",
                format!("{name:?} was added twice"),
            ));
        }
        Ok(self.tmp.join(name))
    }

    /// Adds a blob from memory.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.add_with(name, |w| w.write_all(bytes))
    }

    /// Adds a blob that `write` streams out (for weights too large to hold twice in memory).
    pub fn add_with(
        &mut self,
        name: &str,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let path = self.new_blob_path(name)?;
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = HashingWriter {
            inner: BufWriter::new(file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        write(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| Error::io(&path, e))?;
        let HashingWriter {
            inner,
            hasher,
            bytes,
        } = w;
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        self.blobs.push(BlobEntry {
            name: name.to_string(),
            bytes,
            sha256: hex(&hasher.finalize()),
        });
        Ok(())
    }

    /// Writes the config and the manifest, then publishes the folder as
    /// `root/step-NNNNNNNN` (replacing an existing checkpoint of the same step). Returns its
    /// path.
    pub fn commit(mut self, state: &TrainState, config_toml: &str) -> Result<PathBuf> {
        if state.step != self.step {
            return Err(Error::invalid(
                "state.step",
                format!(
                    "the checkpoint was begun for step {} but the state is at step {}",
                    self.step, state.step
                ),
            ));
        }
        let config_path = self.tmp.join(CONFIG_FILE);
        let write_config = || -> io::Result<()> {
            let mut f = File::create(&config_path)?;
            f.write_all(config_toml.as_bytes())?;
            f.sync_all()
        };
        write_config().map_err(|e| Error::io(&config_path, e))?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            state: state.clone(),
            blobs: self.blobs.clone(),
            config_sha256: hex(&Sha256::digest(config_toml.as_bytes())),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Json {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?;
        let write_manifest = || -> io::Result<()> {
            let mut f = File::create(&manifest_path)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        write_manifest().map_err(|e| Error::io(&manifest_path, e))?;
        sync_dir(&self.tmp)?;

        let dest = self.root.join(checkpoint_dir_name(self.step));
        let old = self.root.join(format!(
            "{OLD_PREFIX}{}-{}",
            checkpoint_dir_name(self.step),
            std::process::id()
        ));
        let replacing = dest.exists();
        if replacing {
            fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
        }
        fs::rename(&self.tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        self.committed = true;
        sync_dir(&self.root)?;
        if replacing {
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        tracing::info!(step = self.step, path = %dest.display(), "checkpoint written");
        Ok(dest)
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A checkpoint opened for reading.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    manifest: Manifest,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: reads the manifest, checks its format and that every blob
    /// and the config are present with the recorded size. Contents are hashed when read.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read(&manifest_path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::checkpoint(
                    dir,
                    format!(
                        "no {MANIFEST_FILE}: not a finished checkpoint (checkpoints written before \
                         deepeyes' checkpoint format {FORMAT_VERSION} have none and cannot be \
                         resumed; start the run over with `deepeyes train --overwrite`)"
                    ),
                )
            } else {
                Error::io(&manifest_path, e)
            }
        })?;
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?;
        match value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
        {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::checkpoint(
                    dir,
                    format!("format version {v}; this build reads version {FORMAT_VERSION}"),
                ));
            }
            None => return Err(Error::checkpoint(dir, "manifest has no format_version")),
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| Error::Json {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?;
        for b in &manifest.blobs {
            check_blob_name(&b.name).map_err(|e| Error::checkpoint(dir, e))?;
            let path = dir.join(&b.name);
            let len = fs::metadata(&path)
                .map_err(|e| Error::checkpoint(dir, format!("blob {}: {e}", b.name)))?
                .len();
            if len != b.bytes {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "blob {} is {len} bytes, the manifest says {}",
                        b.name, b.bytes
                    ),
                ));
            }
        }
        if !dir.join(CONFIG_FILE).is_file() {
            return Err(Error::checkpoint(dir, format!("no {CONFIG_FILE}")));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The checkpoint's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The training state.
    pub fn state(&self) -> &TrainState {
        &self.manifest.state
    }

    /// Names of the stored blobs.
    pub fn blob_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.blobs.iter().map(|b| b.name.as_str())
    }

    fn entry(&self, name: &str) -> Result<&BlobEntry> {
        self.manifest
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| {
                Error::checkpoint(
                    &self.dir,
                    format!(
                        "no blob {name:?} (it has: {})",
                        self.blob_names().collect::<Vec<_>>().join(", ")
                    ),
                )
            })
    }

    /// Path of a blob, for readers that stream or memory-map it; call
    /// [`Checkpoint::verify_blob`] first to check its content.
    pub fn blob_path(&self, name: &str) -> Result<PathBuf> {
        self.entry(name).map(|b| self.dir.join(&b.name))
    }

    /// Reads a blob and checks its size and hash.
    pub fn read_blob(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.entry(name)?;
        let path = self.dir.join(&entry.name);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let sha = hex(&Sha256::digest(&bytes));
        if bytes.len() as u64 != entry.bytes || sha != entry.sha256 {
            return Err(Error::checkpoint(
                &self.dir,
                format!("blob {name} is damaged: its SHA-256 does not match the manifest"),
            ));
        }
        Ok(bytes)
    }

    /// Checks blob `name` against the manifest's size and SHA-256, reading it in pieces.
    pub fn verify_blob(&self, name: &str) -> Result<()> {
        let entry = self.entry(name)?;
        let (bytes, sha) = hash_file(&self.dir.join(&entry.name))?;
        if bytes != entry.bytes || sha != entry.sha256 {
            return Err(Error::checkpoint(
                &self.dir,
                format!("blob {name} is damaged: its SHA-256 does not match the manifest"),
            ));
        }
        Ok(())
    }

    /// Checks every blob and the config against the manifest: what a resumed run relies on.
    pub fn verify(&self) -> Result<()> {
        for name in self.blob_names() {
            self.verify_blob(name)?;
        }
        self.config_toml().map(|_| ())
    }

    /// The stored config text (hash-checked).
    pub fn config_toml(&self) -> Result<String> {
        let path = self.dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        if hex(&Sha256::digest(text.as_bytes())) != self.manifest.config_sha256 {
            return Err(Error::checkpoint(
                &self.dir,
                format!("{CONFIG_FILE} does not match the manifest's hash"),
            ));
        }
        Ok(text)
    }
}

/// The finished checkpoints under `root`, `(step, folder)` in step order. Temporary folders are
/// ignored; a missing `root` has none.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(STEP_PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
            && entry.path().is_dir()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint a resume passed over, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// Its folder.
    pub dir: PathBuf,
    /// Why it cannot be resumed.
    pub reason: String,
}

/// The newest checkpoint under `root` whose every file matches its manifest
/// ([`Checkpoint::verify`]), and the newer ones passed over with the reason for each (a kill
/// mid-write leaves no such folder; damage, truncation or a checkpoint of an older format does).
pub fn latest_intact(root: &Path) -> Result<(Option<Checkpoint>, Vec<Skipped>)> {
    let mut skipped = Vec::new();
    for (step, dir) in list_checkpoints(root)?.into_iter().rev() {
        let checked = Checkpoint::open(&dir).and_then(|c| c.verify().map(|()| c));
        match checked {
            Ok(c) => return Ok((Some(c), skipped)),
            Err(e) => {
                tracing::warn!(step, error = %e, "skipping a checkpoint that cannot be resumed");
                skipped.push(Skipped {
                    dir,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok((None, skipped))
}

/// Removes all but the newest `keep_last` checkpoints (`0` keeps all); returns the removed
/// folders.
pub fn prune_checkpoints(root: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let all = list_checkpoints(root)?;
    let excess = all.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        removed.push(dir);
    }
    Ok(removed)
}
