//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! deepeyes links no ONNX Runtime at build time (ort's `load-dynamic`): the library is opened
//! when the first model loads. It is looked for, in order:
//!
//! 1. `$ORT_DYLIB_PATH` (a library file, or a directory holding one). When set, it is the only
//!    place tried, so a wrong value is an error rather than a silent fallback;
//! 2. the project-local directory that `scripts/setup_ort.sh` fills: `$DEEPEYES_ORT_DIR` if set,
//!    else `.ort/` in the current directory or one of its parents, next to the executable or one
//!    of its parents, or at the root of the source tree deepeyes was built from;
//! 3. the `onnxruntime` Python package of `python3` (its `capi/` directory).
//!
//! When nothing loads, the error lists every place tried and why it failed, and names the one
//! command that fixes it: `scripts/setup_ort.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use super::error::{OnnxError, OnnxResult};

/// Where a library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LibrarySource {
    /// `$ORT_DYLIB_PATH`.
    EnvVar,
    /// The project-local directory filled by `scripts/setup_ort.sh`.
    ProjectDir,
    /// The `onnxruntime` package of `python3`.
    Python,
}

impl std::fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EnvVar => "$ORT_DYLIB_PATH",
            Self::ProjectDir => "project directory (scripts/setup_ort.sh)",
            Self::Python => "python3 onnxruntime package",
        })
    }
}

/// The ONNX Runtime library in use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuntimeInfo {
    /// The library file.
    pub library: PathBuf,
    /// Its version (`1.32.0`), or `unknown`.
    pub version: String,
    /// How it was found.
    pub source: LibrarySource,
    /// Execution providers the library was built with (those deepeyes can ask about).
    pub providers: Vec<String>,
}

/// A loaded runtime: the library's info and the process-wide ONNX Runtime environment.
#[derive(Debug)]
pub struct Runtime {
    info: RuntimeInfo,
    env: ort::environment::Environment,
}

impl Runtime {
    /// What was loaded.
    pub fn info(&self) -> &RuntimeInfo {
        &self.info
    }

    pub(crate) fn env(&self) -> &ort::environment::Environment {
        &self.env
    }
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// The process's ONNX Runtime, loading it on first use (see the module docs for the search
/// order). A failure is not remembered, so a later call (after running the setup script) can
/// succeed.
pub fn runtime() -> OnnxResult<Arc<Runtime>> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = slot.as_ref() {
        return Ok(Arc::clone(rt));
    }
    let rt = Arc::new(load()?);
    *slot = Some(Arc::clone(&rt));
    Ok(rt)
}

/// One place the loader looked, and what happened there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Which step of the search order.
    pub source: LibrarySource,
    /// The file or directory looked at (empty when there was nothing to look at).
    pub location: PathBuf,
    /// Why it was not used.
    pub outcome: String,
}

/// The library files to try, in order, with the places that yielded none.
pub fn candidates() -> (Vec<(LibrarySource, PathBuf)>, Vec<Attempt>) {
    let mut found = Vec::new();
    let mut misses = Vec::new();
    if let Some(value) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if path.is_dir() {
            match library_in(&path) {
                Some(lib) => found.push((LibrarySource::EnvVar, lib)),
                None => misses.push(Attempt {
                    source: LibrarySource::EnvVar,
                    location: path,
                    outcome: format!("a directory without a {} file", lib_pattern()),
                }),
            }
        } else if path.exists() {
            found.push((LibrarySource::EnvVar, path));
        } else {
            misses.push(Attempt {
                source: LibrarySource::EnvVar,
                location: path,
                outcome: "does not exist".into(),
            });
        }
        // An explicit choice is never silently replaced by another library.
        return (found, misses);
    }
    misses.push(Attempt {
        source: LibrarySource::EnvVar,
        location: PathBuf::new(),
        outcome: "not set".into(),
    });

    for dir in project_dirs() {
        match library_in(&dir) {
            Some(lib) => found.push((LibrarySource::ProjectDir, lib)),
            None => misses.push(Attempt {
                source: LibrarySource::ProjectDir,
                location: dir.clone(),
                outcome: if dir.is_dir() {
                    format!("no {} file", lib_pattern())
                } else {
                    "does not exist".into()
                },
            }),
        }
    }

    match python_capi_dir() {
        Ok(dir) => match library_in(&dir) {
            Some(lib) => found.push((LibrarySource::Python, lib)),
            None => misses.push(Attempt {
                source: LibrarySource::Python,
                location: dir,
                outcome: format!("no {} file", lib_pattern()),
            }),
        },
        Err(why) => misses.push(Attempt {
            source: LibrarySource::Python,
            location: PathBuf::new(),
            outcome: why,
        }),
    }
    (found, misses)
}

fn load() -> OnnxResult<Runtime> {
    let (found, mut attempts) = candidates();
    for (source, path) in found {
        match ort::init_from(&path) {
            Ok(builder) => {
                let env =
                    builder
                        .with_name("deepeyes")
                        .build()
                        .map_err(|e| OnnxError::Runtime {
                            library: path.clone(),
                            message: e.to_string(),
                        })?;
                let library = std::fs::canonicalize(&path).unwrap_or(path);
                let info = RuntimeInfo {
                    version: version_of(&library),
                    providers: compiled_providers(),
                    library,
                    source,
                };
                tracing::info!(
                    library = %info.library.display(),
                    version = %info.version,
                    source = %info.source,
                    "loaded ONNX Runtime"
                );
                return Ok(Runtime { info, env });
            }
            Err(e) => attempts.push(Attempt {
                source,
                location: path,
                outcome: e.to_string(),
            }),
        }
    }
    Err(OnnxError::RuntimeNotFound(not_found_message(&attempts)))
}

fn not_found_message(attempts: &[Attempt]) -> String {
    let mut msg = String::from(
        "no usable ONNX Runtime library (libonnxruntime, version 1.31 or newer). Tried:\n",
    );
    for a in attempts {
        if a.location.as_os_str().is_empty() {
            msg.push_str(&format!("  - {}: {}\n", a.source, a.outcome));
        } else {
            msg.push_str(&format!(
                "  - {} {}: {}\n",
                a.source,
                a.location.display(),
                a.outcome
            ));
        }
    }
    msg.push_str(
        "Fix: run `scripts/setup_ort.sh` in the deepeyes repository (it downloads the library into .ort/), \
         or set ORT_DYLIB_PATH to a libonnxruntime shared library.",
    );
    msg
}

/// The project-local directories, most specific first, without duplicates.
fn project_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("DEEPEYES_ORT_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.extend(
            cwd.ancestors()
                .map(|a| a.join(".ort"))
                .filter(|d| d.is_dir()),
        );
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.extend(
            exe_dir
                .ancestors()
                .map(|a| a.join(".ort"))
                .filter(|d| d.is_dir()),
        );
    }
    // The source tree this build came from (useful for tests and `cargo run`).
    let source_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".ort");
    dirs.push(source_root);
    let mut unique: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let key = std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        if !unique
            .iter()
            .any(|u| std::fs::canonicalize(u).unwrap_or_else(|_| u.clone()) == key)
        {
            unique.push(d);
        }
    }
    unique
}

fn lib_pattern() -> String {
    format!(
        "{}onnxruntime{}*",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The ONNX Runtime library in `dir`: the unversioned name if present, else the newest
/// versioned file (`libonnxruntime.so.1.32.0`, `libonnxruntime.1.32.0.dylib`).
pub fn library_in(dir: &Path) -> Option<PathBuf> {
    let prefix = format!("{}onnxruntime", std::env::consts::DLL_PREFIX);
    let suffix = std::env::consts::DLL_SUFFIX;
    let exact = dir.join(format!("{prefix}{suffix}"));
    if exact.is_file() {
        return Some(exact);
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        // "`.so.1.32.0`" (Linux) or "`.1.32.0.dylib`" (macOS); never `_providers_cuda.so`.
        let version = if let Some(v) = rest.strip_prefix(suffix).and_then(|r| r.strip_prefix('.')) {
            v
        } else if let Some(v) = rest.strip_suffix(suffix).and_then(|r| r.strip_prefix('.')) {
            v
        } else {
            continue;
        };
        let Ok(parts) = version
            .split('.')
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| parts > *b) {
            best = Some((parts, entry.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// The `capi/` directory of `python3`'s onnxruntime package, found without importing it.
fn python_capi_dir() -> Result<PathBuf, String> {
    let script = "import importlib.util, os, sys\n\
                  s = importlib.util.find_spec('onnxruntime')\n\
                  sys.exit(3) if s is None or not s.origin else print(os.path.join(os.path.dirname(s.origin), 'capi'))";
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .map_err(|e| format!("python3 could not be run ({e})"))?;
    if out.status.code() == Some(3) {
        return Err("python3 has no onnxruntime package".into());
    }
    if !out.status.success() {
        return Err(format!(
            "python3 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// The library version from its file name (`libonnxruntime.so.1.32.0`, `libonnxruntime.1.32.0.dylib`;
/// ONNX Runtime's build info does not carry it), or `unknown`.
fn version_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parts: Vec<&str> = name
        .split('.')
        .skip_while(|p| p.parse::<u64>().is_err())
        .take_while(|p| p.parse::<u64>().is_ok())
        .collect();
    if parts.is_empty() {
        "unknown".into()
    } else {
        parts.join(".")
    }
}

/// The execution providers of the loaded library that this build can register.
fn compiled_providers() -> Vec<String> {
    use ort::ep::ExecutionProvider;
    let mut out = Vec::new();
    #[cfg(feature = "cuda")]
    if ort::ep::CUDA::is_available().unwrap_or(false) {
        out.push("CUDAExecutionProvider".to_string());
    }
    if ort::ep::CPU::is_available().unwrap_or(true) {
        out.push("CPUExecutionProvider".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_versioned_library() {
        let dir = tempfile::tempdir().unwrap();
        let p = std::env::consts::DLL_PREFIX;
        let s = std::env::consts::DLL_SUFFIX;
        assert_eq!(library_in(dir.path()), None);
        for name in [
            format!("{p}onnxruntime_providers_cuda{s}"),
            format!("{p}onnxruntime{s}.1.9.0"),
            format!("{p}onnxruntime{s}.1.32.0"),
            format!("{p}onnxruntime{s}.1.31.1"),
            format!("{p}onnxruntime{s}.bak"),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let got = library_in(dir.path()).unwrap();
        assert_eq!(
            got.file_name().unwrap().to_string_lossy(),
            format!("{p}onnxruntime{s}.1.32.0")
        );
        std::fs::write(dir.path().join(format!("{p}onnxruntime{s}")), b"").unwrap();
        let got = library_in(dir.path()).unwrap();
        assert_eq!(
            got.file_name().unwrap().to_string_lossy(),
            format!("{p}onnxruntime{s}")
        );
    }

    #[test]
    fn versions_come_from_file_names() {
        assert_eq!(
            version_of(Path::new("/a/libonnxruntime.so.1.32.0")),
            "1.32.0"
        );
        assert_eq!(
            version_of(Path::new("/a/libonnxruntime.1.31.1.dylib")),
            "1.31.1"
        );
        assert_eq!(version_of(Path::new("/a/libonnxruntime.so")), "unknown");
    }

    #[test]
    fn the_not_found_message_names_the_fix() {
        let msg = not_found_message(&[
            Attempt {
                source: LibrarySource::EnvVar,
                location: PathBuf::new(),
                outcome: "not set".into(),
            },
            Attempt {
                source: LibrarySource::ProjectDir,
                location: PathBuf::from("/x/.ort"),
                outcome: "does not exist".into(),
            },
        ]);
        assert!(msg.contains("$ORT_DYLIB_PATH: not set"), "{msg}");
        assert!(msg.contains("/x/.ort: does not exist"), "{msg}");
        assert!(msg.contains("scripts/setup_ort.sh"), "{msg}");
    }
}
