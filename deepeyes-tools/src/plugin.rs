//! The host side of the plugin ABI: loading a tool plugin from a shared library and running it
//! behind the safe [`deepeyes_core::Tool`] trait.
//!
//! Load sequence ([`LoadedPlugin::load`]): resolve the user-given path; open the library; read
//! the version symbol and refuse another major or a newer minor; read the descriptor and check
//! its size, version, pointers and flags; ask it to `describe` itself and parse the spec
//! strictly; [`LoadedPlugin::instantiate`] then creates an instance with the user's JSON config
//! and wraps it in a [`DynTool`].
//!
//! Libraries are never unloaded: once opened, a library stays mapped for the life of the process
//! (as ONNX Runtime, tree-sitter and abi_stable loaders do), so no function pointer can dangle.
//! Plugins are only ever loaded from paths a user gives in a config file or on the command line,
//! never from anything a model writes.
//!
//! Each call of a [`DynTool`] runs under a timeout; [`isolate`] runs a plugin in a child process
//! instead ([`host`] is that process's side), so that what no panic guard catches (a segfault,
//! an abort, a hang, a runaway allocation) costs only the child.

use std::ffi::{CStr, c_void};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use deepeyes_core::{Image, ImageLimits, Tool, ToolContext, ToolError, ToolOutput, ToolSpec};
use libloading::Library;
use serde::{Deserialize, Serialize};

use crate::abi::{
    ABI_MAJOR, ABI_MINOR, AbiBuffer, AbiImageView, AbiToolOutput, CallFn, CreateFn, DescribeFn,
    DestroyFn, ENTRY_SYMBOL, FLAG_THREAD_SAFE, FORMAT_RGB8, FreeOutputFn, STATUS_BAD_ARGS,
    STATUS_OK, STATUS_PANIC, STATUS_TOOL_ERROR, STATUS_UNSUPPORTED, ToolPluginV1, VERSION_SYMBOL,
    split_version,
};
use crate::registry::validate_tool_name;

pub mod host;
pub mod isolate;
mod wire;

/// Why a plugin could not be loaded. Every variant names the plugin's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The path does not exist.
    #[error("plugin {path}: file not found")]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The file exists but could not be opened as a shared library.
    #[error("plugin {path}: not a loadable shared library: {reason}")]
    Open {
        /// The plugin.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// A required symbol is not exported.
    #[error(
        "plugin {path}: missing symbol `{symbol}` (was it built with deepeyes_tools::export_tool!?)"
    )]
    MissingSymbol {
        /// The plugin.
        path: PathBuf,
        /// The symbol.
        symbol: &'static str,
    },
    /// The plugin speaks an ABI version this host does not support.
    #[error(
        "plugin {path}: ABI version {plugin_major}.{plugin_minor} is not supported by this host (ABI {host_major}.{host_minor}: same major and a minor no newer are required); rebuild the plugin against this deepeyes-tools"
    )]
    AbiMismatch {
        /// The plugin.
        path: PathBuf,
        /// The plugin's major version.
        plugin_major: u32,
        /// The plugin's minor version.
        plugin_minor: u32,
        /// The host's major version.
        host_major: u32,
        /// The host's minor version.
        host_minor: u32,
    },
    /// The descriptor is malformed.
    #[error("plugin {path}: bad descriptor: {reason}")]
    BadDescriptor {
        /// The plugin.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tool spec returned by `describe` is malformed.
    #[error("plugin {path}: bad tool spec: {reason}")]
    BadSpec {
        /// The plugin.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The plugin's tool name is already taken in the registry.
    #[error("plugin {path}: a tool named '{name}' is already registered ({existing})")]
    DuplicateName {
        /// The plugin.
        path: PathBuf,
        /// The name.
        name: String,
        /// Where the registered tool came from.
        existing: String,
    },
    /// `create` failed.
    #[error("plugin {path}: creating the tool failed: {reason}")]
    Create {
        /// The plugin.
        path: PathBuf,
        /// The plugin's message.
        reason: String,
    },
    /// An isolated plugin's host process could not be started, or failed while loading it.
    #[error("plugin {path}: its plugin host {host}: {reason}")]
    Host {
        /// The plugin.
        path: PathBuf,
        /// The host program.
        host: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An isolated plugin's host process refused the plugin; `message` is the loader's error
    /// there (it names the plugin's path).
    #[error("{message} (in its plugin host process)")]
    InHost {
        /// The plugin.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
}

/// The absolute path of a plugin library, or why it cannot be one.
fn resolve_path(given: &Path) -> Result<PathBuf, PluginError> {
    let path = std::fs::canonicalize(given).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PluginError::NotFound {
            path: given.to_path_buf(),
        },
        _ => PluginError::Open {
            path: given.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    if !path.is_file() {
        return Err(PluginError::Open {
            path,
            reason: "not a regular file".into(),
        });
    }
    Ok(path)
}

/// Limits on what a plugin may hand back from one call; over-limit outputs become tool errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PluginLimits {
    /// Most bytes of text (or error text) accepted from one call.
    pub max_text_bytes: usize,
    /// Most pixels of an image accepted from one call.
    pub max_image_pixels: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            // A whole trajectory is capped at 28 672 tokens; 1 MiB of text is far beyond that.
            max_text_bytes: 1 << 20,
            max_image_pixels: ImageLimits::default().max_pixels,
        }
    }
}

/// Largest spec JSON accepted from `describe`.
const MAX_SPEC_BYTES: usize = 1 << 20;

/// Libraries opened so far. Holding them here keeps every plugin mapped until the process exits.
static KEEP_LOADED: Mutex<Vec<Arc<Library>>> = Mutex::new(Vec::new());

/// The validated function pointers of a descriptor.
#[derive(Debug, Clone, Copy)]
struct PluginFns {
    describe: DescribeFn,
    create: CreateFn,
    destroy: DestroyFn,
    call: CallFn,
    free_output: FreeOutputFn,
}

/// A plugin library that passed every load check.
#[derive(Debug)]
pub struct LoadedPlugin {
    path: PathBuf,
    name: String,
    plugin_version: String,
    abi: (u32, u32),
    thread_safe: bool,
    spec: ToolSpec,
    fns: PluginFns,
    /// Keeps the library mapped (`None` for tools compiled into this binary, in tests).
    _library: Option<Arc<Library>>,
}

/// Reads the contents of an output the plugin filled, then frees it through the plugin. The
/// closure sees the output while it is still valid.
///
/// # Safety
/// `out` must have been filled by a function of the plugin whose `free_output` is `free`, and
/// not been freed yet.
unsafe fn consume_output<R>(
    out: &mut AbiToolOutput,
    free: FreeOutputFn,
    read: impl FnOnce(&AbiToolOutput) -> R,
) -> R {
    let result = read(out);
    // SAFETY: the caller guarantees `out` holds this plugin's buffers, not yet freed; they are
    // freed exactly once here, by the plugin that allocated them.
    unsafe { free(out) };
    result
}

/// Borrows a buffer's bytes if present, refusing more than `max` bytes before touching them.
///
/// # Safety
/// A present buffer must point to `len` readable bytes (the plugin's contract), valid until the
/// output is freed.
unsafe fn buffer_bytes<'a>(
    buf: &'a AbiBuffer,
    max: usize,
    what: &str,
) -> Result<Option<&'a [u8]>, String> {
    if !buf.is_present() {
        return Ok(None);
    }
    if buf.len > max {
        return Err(format!(
            "{what} is {} bytes, over the limit of {max} bytes",
            buf.len
        ));
    }
    // SAFETY: present, so `ptr` is non-null and points to `len` bytes the plugin allocated and
    // keeps alive until `free_output` (caller's contract); `len <= max` bounds the slice.
    Ok(Some(unsafe {
        std::slice::from_raw_parts(buf.ptr, buf.len)
    }))
}

/// The error message in an output, lossily decoded and cut to `max` bytes.
///
/// # Safety
/// As for [`buffer_bytes`].
unsafe fn error_text(out: &AbiToolOutput, max: usize) -> String {
    if !out.error.is_present() {
        return "no error message".to_string();
    }
    let shown = out.error.len.min(max);
    // SAFETY: present buffer of `len >= shown` readable bytes (caller's contract).
    let bytes = unsafe { std::slice::from_raw_parts(out.error.ptr, shown) };
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if shown < out.error.len {
        text.push_str(&format!(" … ({} bytes cut)", out.error.len - shown));
    }
    text
}

/// Reads a descriptor string.
///
/// # Safety
/// `ptr` must be null or point to a NUL-terminated string that stays valid (the ABI requires a
/// static one).
unsafe fn c_string(ptr: *const std::ffi::c_char, what: &str) -> Result<String, String> {
    if ptr.is_null() {
        return Err(format!("{what} is a null pointer"));
    }
    // SAFETY: non-null; the caller guarantees a valid NUL-terminated string.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(str::to_string)
        .map_err(|e| format!("{what} is not UTF-8: {e}"))
}

impl LoadedPlugin {
    /// Loads and validates the plugin at `path` (resolved to an absolute path). The library stays
    /// loaded for the rest of the process.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, PluginError> {
        let path = resolve_path(path.as_ref())?;
        tracing::debug!(path = %path.display(), "loading tool plugin");
        // SAFETY: opening a library runs its initialisers. The path comes from the user's config
        // or command line (never from model output) and loading it is exactly what was asked.
        let library = unsafe { Library::new(&path) }.map_err(|e| PluginError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let library = Arc::new(library);
        KEEP_LOADED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&library));

        let missing = |symbol| PluginError::MissingSymbol {
            path: path.clone(),
            symbol,
        };
        // SAFETY: the ABI defines this symbol as `extern "C" fn() -> u32`. The library is never
        // unloaded, so the copied function pointer stays valid.
        let version_fn: unsafe extern "C" fn() -> u32 =
            *unsafe { library.get::<unsafe extern "C" fn() -> u32>(VERSION_SYMBOL.as_bytes()) }
                .map_err(|_| missing(VERSION_SYMBOL))?;
        // SAFETY: an argument-less C function returning an integer.
        let version = unsafe { version_fn() };
        let (major, minor) = split_version(version);
        if major != ABI_MAJOR || minor > ABI_MINOR {
            return Err(PluginError::AbiMismatch {
                path,
                plugin_major: major,
                plugin_minor: minor,
                host_major: ABI_MAJOR,
                host_minor: ABI_MINOR,
            });
        }
        // SAFETY: the ABI defines this symbol as `extern "C" fn() -> *const ToolPluginV1`; the
        // library is never unloaded.
        let entry_fn: unsafe extern "C" fn() -> *const ToolPluginV1 = *unsafe {
            library.get::<unsafe extern "C" fn() -> *const ToolPluginV1>(ENTRY_SYMBOL.as_bytes())
        }
        .map_err(|_| missing(ENTRY_SYMBOL))?;
        // SAFETY: an argument-less C function returning a pointer.
        let desc_ptr = unsafe { entry_fn() };
        // SAFETY: the pointer comes from the plugin's entry symbol, which the ABI requires to
        // return null or a static descriptor; the library stays loaded.
        let plugin = unsafe { Self::from_descriptor(path, Some(library), version, desc_ptr) }?;
        tracing::info!(
            path = %plugin.path.display(),
            tool = %plugin.name,
            version = %plugin.plugin_version,
            "loaded tool plugin"
        );
        Ok(Arc::new(plugin))
    }

    /// Validates a descriptor (steps 4–5 of the load sequence) and asks the plugin to describe
    /// itself.
    ///
    /// # Safety
    /// `desc_ptr` must be null or point to a descriptor that stays readable during this call,
    /// whose function pointers stay callable for as long as the result lives (the library is
    /// kept loaded, or the functions are part of this binary).
    unsafe fn from_descriptor(
        path: PathBuf,
        library: Option<Arc<Library>>,
        version: u32,
        desc_ptr: *const ToolPluginV1,
    ) -> Result<Self, PluginError> {
        let (major, minor) = split_version(version);
        let bad = |reason: String| PluginError::BadDescriptor {
            path: path.clone(),
            reason,
        };
        if desc_ptr.is_null() {
            return Err(bad("the entry symbol returned a null descriptor".into()));
        }
        if !desc_ptr.is_aligned() {
            return Err(bad("the descriptor is misaligned".into()));
        }
        // SAFETY: non-null and aligned; every descriptor version starts with `struct_size`, so
        // reading that one field is valid whatever the plugin's minor version.
        let struct_size = unsafe { desc_ptr.cast::<usize>().read() };
        let needed = std::mem::size_of::<ToolPluginV1>();
        if struct_size < needed {
            return Err(bad(format!(
                "struct_size is {struct_size} bytes, but ABI {major}.{minor} needs at least {needed}"
            )));
        }
        // SAFETY: the plugin declares at least `needed` bytes of descriptor, so every field of
        // `ToolPluginV1` is covered; the descriptor is never written while we read it.
        let desc = unsafe { &*desc_ptr };
        if desc.abi_version != version {
            return Err(bad(format!(
                "abi_version {:#x} disagrees with the version symbol ({version:#x})",
                desc.abi_version
            )));
        }
        if desc.flags & !FLAG_THREAD_SAFE != 0 {
            return Err(bad(format!("unknown flags {:#x}", desc.flags)));
        }
        // SAFETY: the ABI requires both fields to be null or static NUL-terminated strings.
        let name = unsafe { c_string(desc.name, "name") }.map_err(&bad)?;
        // SAFETY: as above.
        let plugin_version =
            unsafe { c_string(desc.plugin_version, "plugin_version") }.map_err(&bad)?;
        fn need<F>(f: Option<F>, what: &str) -> Result<F, String> {
            f.ok_or_else(|| format!("function pointer `{what}` is null"))
        }
        let fns = PluginFns {
            describe: need(desc.describe, "describe").map_err(&bad)?,
            create: need(desc.create, "create").map_err(&bad)?,
            destroy: need(desc.destroy, "destroy").map_err(&bad)?,
            call: need(desc.call, "call").map_err(&bad)?,
            free_output: need(desc.free_output, "free_output").map_err(&bad)?,
        };
        let spec = Self::describe(&path, &name, fns)?;
        Ok(Self {
            path,
            name,
            plugin_version,
            abi: (major, minor),
            thread_safe: desc.flags & FLAG_THREAD_SAFE != 0,
            spec,
            fns,
            _library: library,
        })
    }

    /// Asks the plugin for its spec and checks it.
    fn describe(path: &Path, name: &str, fns: PluginFns) -> Result<ToolSpec, PluginError> {
        let bad = |reason: String| PluginError::BadSpec {
            path: path.to_path_buf(),
            reason,
        };
        let mut out = AbiToolOutput::EMPTY;
        // SAFETY: `describe` takes a pointer to a writable output, which `out` is.
        let status = unsafe { (fns.describe)(&mut out) };
        // SAFETY: `out` was just filled by this plugin's `describe`.
        let text = unsafe {
            consume_output(&mut out, fns.free_output, |out| {
                if status != STATUS_OK {
                    return Err(format!(
                        "describe failed with status {status}: {}",
                        error_text(out, 4096)
                    ));
                }
                let bytes = buffer_bytes(&out.text, MAX_SPEC_BYTES, "the spec")?
                    .ok_or_else(|| "describe returned no text".to_string())?;
                std::str::from_utf8(bytes)
                    .map(str::to_string)
                    .map_err(|e| format!("the spec is not valid UTF-8: {e}"))
            })
        }
        .map_err(&bad)?;
        let spec: ToolSpec =
            serde_json::from_str(&text).map_err(|e| bad(format!("{e} in {text}")))?;
        if spec.name != name {
            return Err(bad(format!(
                "the spec names the tool '{}' but the descriptor names it '{name}'",
                spec.name
            )));
        }
        validate_tool_name(&spec.name).map_err(&bad)?;
        if spec.description.trim().is_empty() {
            return Err(bad("the description is empty".into()));
        }
        if spec.parameters.get("type").and_then(|t| t.as_str()) != Some("object") {
            return Err(bad(format!(
                "parameters must be a JSON schema object ({{\"type\": \"object\", …}}), got {}",
                spec.parameters
            )));
        }
        Ok(spec)
    }

    /// The absolute path the plugin was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's own version string.
    pub fn plugin_version(&self) -> &str {
        &self.plugin_version
    }

    /// The ABI version `(major, minor)` the plugin was built for.
    pub fn abi_version(&self) -> (u32, u32) {
        self.abi
    }

    /// Whether the plugin declared its calls thread-safe.
    pub fn thread_safe(&self) -> bool {
        self.thread_safe
    }

    /// The tool's spec.
    pub fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    /// Creates an instance configured with `config` (JSON; `null` for none) whose outputs are
    /// checked against `limits`.
    pub fn instantiate(
        self: &Arc<Self>,
        config: &serde_json::Value,
        limits: PluginLimits,
    ) -> Result<DynTool, PluginError> {
        let config = if config.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(config).map_err(|e| PluginError::Create {
                path: self.path.clone(),
                reason: format!("cannot serialise the configuration: {e}"),
            })?
        };
        let instance = self.create(&config).map_err(|reason| PluginError::Create {
            path: self.path.clone(),
            reason,
        })?;
        Ok(DynTool {
            slot: RwLock::new(Slot {
                instance: Some(Arc::new(Instance {
                    ptr: instance,
                    plugin: Arc::clone(self),
                })),
                generation: 0,
                broken: None,
            }),
            plugin: Arc::clone(self),
            config,
            limits,
            timeout: Some(DEFAULT_CALL_TIMEOUT),
        })
    }

    /// Runs the plugin's `create`; returns the instance or the plugin's error text.
    fn create(&self, config: &[u8]) -> Result<*mut c_void, String> {
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut out = AbiToolOutput::EMPTY;
        // SAFETY: `config` is readable for its length during the call, `instance` is a writable
        // pointer slot and `out` a writable output.
        let status =
            unsafe { (self.fns.create)(config.as_ptr(), config.len(), &mut instance, &mut out) };
        // SAFETY: `out` was just filled by this plugin's `create`.
        let error = unsafe {
            consume_output(&mut out, self.fns.free_output, |out| {
                (status != STATUS_OK).then(|| error_text(out, 4096))
            })
        };
        match error {
            Some(message) => Err(format!("status {status}: {message}")),
            None if instance.is_null() => Err("create returned no instance".into()),
            None => Ok(instance),
        }
    }

    /// Runs the plugin's `destroy` on an instance.
    fn destroy(&self, instance: *mut c_void) {
        if !instance.is_null() {
            // SAFETY: `instance` came from this plugin's `create` and is destroyed exactly once
            // (by the `Drop` of its only `Instance`, after every call holding it returned).
            unsafe { (self.fns.destroy)(instance) };
        }
    }
}

/// A live plugin instance, destroyed through its plugin when the last holder drops it: the tool's
/// slot, or a call abandoned past its timeout that is still running on its own thread.
#[derive(Debug)]
struct Instance {
    ptr: *mut c_void,
    plugin: Arc<LoadedPlugin>,
}

// SAFETY: the pointer is only ever passed back to the plugin that created it. Calls of plugins
// not flagged thread-safe are serialized by `DynTool`'s write lock, and an instance is replaced
// (never reused) when a call on it is abandoned, so no instance is used from two threads at once
// unless its plugin declared that safe. `destroy` runs once, when the last holder drops it, so
// after every call on it has returned.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        self.plugin.destroy(self.ptr);
    }
}

#[derive(Debug)]
struct Slot {
    /// `None` only while recreating, or once recreating failed (`broken` says why).
    instance: Option<Arc<Instance>>,
    /// Bumped each time the instance is recreated after a panic or a timeout.
    generation: u64,
    /// Set when recreating failed: the tool answers every call with this error.
    broken: Option<String>,
}

enum SlotGuard<'a> {
    Shared(RwLockReadGuard<'a, Slot>),
    Exclusive(RwLockWriteGuard<'a, Slot>),
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        match self {
            Self::Shared(g) => g,
            Self::Exclusive(g) => g,
        }
    }
}

/// The longest a plugin call may run unless its config says otherwise (`timeout-secs`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Stack of the thread a timed call runs on (a plugin ran on the caller's stack before; 8 MiB is
/// what a main thread gets).
const CALL_STACK_BYTES: usize = 8 << 20;

/// One call's inputs, owned, so that a call abandoned past its timeout keeps valid inputs for as
/// long as it runs.
struct CallJob {
    instance: Arc<Instance>,
    args: Vec<u8>,
    image: Option<Image>,
    limits: PluginLimits,
}

/// What a finished call returned: its status and its output, already copied into host memory
/// and freed through the plugin.
type CallResult = (i32, Result<ToolOutput, String>);

impl CallJob {
    fn run(self) -> CallResult {
        let plugin = &self.instance.plugin;
        let view = self.image.as_ref().map(|im| AbiImageView {
            ptr: im.as_raw().as_ptr(),
            len: im.as_raw().len(),
            width: im.width(),
            height: im.height(),
            stride: im.width() as usize * 3,
            format: FORMAT_RGB8,
        });
        let view_ptr = view
            .as_ref()
            .map_or(std::ptr::null(), |v| v as *const AbiImageView);
        let mut out = AbiToolOutput::EMPTY;
        // SAFETY: the instance is live (it is destroyed only when its last `Arc`, one of which
        // this job holds, is dropped); `args` and the image pixels are owned by this job and
        // outlive the call; `out` is writable. The caller serializes calls on this instance
        // unless the plugin is flagged thread-safe.
        let status = unsafe {
            (plugin.fns.call)(
                self.instance.ptr,
                self.args.as_ptr(),
                self.args.len(),
                view_ptr,
                &mut out,
            )
        };
        // SAFETY: `out` was just filled by this plugin's `call`.
        let result = unsafe {
            consume_output(&mut out, plugin.fns.free_output, |out| {
                read_output(&plugin.name, self.limits, status, out)
            })
        };
        (status, result)
    }
}

/// Copies a call's output into host memory, checking it against the limits.
///
/// # Safety
/// `out` must have been filled by the plugin's `call` and not been freed.
unsafe fn read_output(
    name: &str,
    limits: PluginLimits,
    status: i32,
    out: &AbiToolOutput,
) -> Result<ToolOutput, String> {
    let max = limits.max_text_bytes;
    if status != STATUS_OK {
        // SAFETY: caller's contract.
        let message = unsafe { error_text(out, max) };
        return Err(match status {
            STATUS_BAD_ARGS => format!("invalid arguments for {name}: {message}"),
            STATUS_TOOL_ERROR => message,
            STATUS_PANIC => format!("{name} crashed: {message}"),
            STATUS_UNSUPPORTED => format!("{name} does not support this: {message}"),
            other => format!("{name} failed with unknown status {other}: {message}"),
        });
    }
    // SAFETY: caller's contract.
    let text = match unsafe { buffer_bytes(&out.text, max, "its text output") } {
        Err(e) => return Err(format!("{name} returned an output that is too large: {e}")),
        Ok(None) => None,
        Ok(Some(bytes)) => Some(
            std::str::from_utf8(bytes)
                .map_err(|e| format!("{name} returned text that is not valid UTF-8: {e}"))?
                .to_string(),
        ),
    };
    let mut images = Vec::new();
    if out.image.is_present() {
        // SAFETY: caller's contract.
        images.push(unsafe { read_image(name, limits, out) }?);
    }
    // Plugins do not report a region: the C ABI carries none.
    Ok(ToolOutput {
        text,
        images,
        region: None,
    })
}

/// Copies the (present) image of a call's output, checking its size.
///
/// # Safety
/// As for [`read_output`].
unsafe fn read_image(
    name: &str,
    limits: PluginLimits,
    out: &AbiToolOutput,
) -> Result<Image, String> {
    let (w, h) = (out.image_width, out.image_height);
    let pixels = u64::from(w) * u64::from(h);
    if w == 0 || h == 0 {
        return Err(format!("{name} returned an empty {w}×{h} image"));
    }
    if pixels > limits.max_image_pixels {
        return Err(format!(
            "{name} returned an image that is too large: {w}×{h} = {pixels} pixels, over the limit of {}",
            limits.max_image_pixels
        ));
    }
    let expected = pixels * 3;
    if out.image.len as u64 != expected {
        return Err(format!(
            "{name} returned a {w}×{h} RGB image with {} bytes instead of {expected}",
            out.image.len
        ));
    }
    // SAFETY: caller's contract; the length was checked against the pixel limit above.
    let bytes =
        unsafe { buffer_bytes(&out.image, expected as usize, "its image") }?.unwrap_or_default();
    Image::from_raw(w, h, bytes.to_vec())
        .map_err(|e| format!("{name} returned an unusable image: {e}"))
}

/// How a timed call ended.
enum Finished {
    Returned(CallResult),
    /// It ran past the timeout and was abandoned; its thread may still be running.
    TimedOut(Duration),
    /// No thread could be started for it.
    NoThread(String),
}

/// A plugin tool instance behind the safe [`Tool`] trait, called in this process.
///
/// Calls of plugins not flagged thread-safe are serialized. An instance that panicked is
/// destroyed and created again before the next call. Each call runs on a thread of its own and
/// is abandoned once it runs past the timeout ([`DEFAULT_CALL_TIMEOUT`] unless set with
/// [`DynTool::with_timeout`]): the caller gets a tool error and the tool a fresh instance.
/// Nothing in a process can stop a thread, so an abandoned call keeps running (and keeps its
/// instance alive) until it returns, forever if it never does; only
/// [isolation](crate::plugin::isolate) can stop a runaway plugin.
#[derive(Debug)]
pub struct DynTool {
    // Declared before `plugin` so the slot (whose instance `Drop` destroys) goes first.
    slot: RwLock<Slot>,
    plugin: Arc<LoadedPlugin>,
    config: Vec<u8>,
    limits: PluginLimits,
    timeout: Option<Duration>,
}

impl DynTool {
    /// The plugin this tool comes from.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// Sets the longest a call may run; `None` runs each call on the caller's thread with no
    /// timeout (the plugin host does that: its parent enforces the timeout by killing it).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest a call may run (`None`: no limit).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How many times the instance was recreated after a panic or a timeout.
    pub fn restarts(&self) -> u64 {
        self.slot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }

    fn lock(&self) -> SlotGuard<'_> {
        if self.plugin.thread_safe {
            SlotGuard::Shared(self.slot.read().unwrap_or_else(PoisonError::into_inner))
        } else {
            SlotGuard::Exclusive(self.slot.write().unwrap_or_else(PoisonError::into_inner))
        }
    }

    /// Recreates the instance after a failed call, keeping an exclusive lock held throughout so
    /// that no other call of a non-thread-safe plugin reaches the old instance in between.
    fn recreate_after(&self, guard: SlotGuard<'_>, generation: u64, why: &str) {
        match guard {
            SlotGuard::Exclusive(mut slot) => self.recreate(&mut slot, generation, why),
            SlotGuard::Shared(slot) => {
                drop(slot);
                let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
                self.recreate(&mut slot, generation, why);
            }
        }
    }

    /// Drops the instance (destroyed now, or when an abandoned call on it returns) and creates
    /// a new one, unless another thread already did since `generation`.
    fn recreate(&self, slot: &mut Slot, generation: u64, why: &str) {
        if slot.generation != generation {
            return;
        }
        slot.instance = None;
        slot.generation += 1;
        match self.plugin.create(&self.config) {
            Ok(ptr) => {
                slot.instance = Some(Arc::new(Instance {
                    ptr,
                    plugin: Arc::clone(&self.plugin),
                }));
            }
            Err(e) => {
                tracing::error!(
                    plugin = %self.plugin.path.display(),
                    "recreating the tool after {why} failed: {e}"
                );
                slot.broken = Some(format!("it {why} and could not be restarted ({e})"));
            }
        }
    }

    /// Runs a call, on a thread of its own when there is a timeout.
    fn run(&self, job: CallJob) -> Finished {
        let Some(timeout) = self.timeout else {
            return Finished::Returned(job.run());
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name(format!("plugin {}", self.plugin.name))
            .stack_size(CALL_STACK_BYTES)
            .spawn(move || {
                // The receiver is gone when the call was abandoned; the output was already
                // copied and freed, so dropping it here leaks nothing.
                let _ = tx.send(job.run());
            });
        if let Err(e) = spawned {
            return Finished::NoThread(e.to_string());
        }
        match rx.recv_timeout(timeout) {
            Ok(result) => Finished::Returned(result),
            Err(RecvTimeoutError::Timeout) => Finished::TimedOut(timeout),
            // The thread ended without sending: `run` itself panicked (a bug of this host, not of
            // the plugin, whose panics the guest code catches).
            Err(RecvTimeoutError::Disconnected) => {
                Finished::Returned((STATUS_PANIC, Err("the call's thread died".into())))
            }
        }
    }
}

/// `1 s`, `0.25 s`: a duration for a message.
pub(crate) fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Tool for DynTool {
    fn spec(&self) -> ToolSpec {
        self.plugin.spec.clone()
    }

    fn name(&self) -> String {
        self.plugin.name.clone()
    }

    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> Result<ToolOutput, ToolError> {
        let name = &self.plugin.name;
        let args = serde_json::to_vec(args)
            .map_err(|e| ToolError::new(format!("cannot serialise the arguments: {e}")))?;
        let slot = self.lock();
        let instance = match (&slot.broken, &slot.instance) {
            (None, Some(instance)) => Arc::clone(instance),
            (broken, _) => {
                let why = broken.as_deref().unwrap_or("it has no instance");
                return Err(ToolError::new(format!("{name} is unavailable: {why}")));
            }
        };
        let generation = slot.generation;
        let job = CallJob {
            instance,
            args,
            // `Image` shares its pixels: a cheap clone the call's thread can own.
            image: ctx.original_images.first().cloned(),
            limits: self.limits,
        };
        let result = match self.run(job) {
            Finished::Returned((status, result)) => {
                if status == STATUS_PANIC {
                    tracing::warn!(
                        plugin = %self.plugin.path.display(),
                        "tool {name} panicked; recreating its instance"
                    );
                    self.recreate_after(slot, generation, "crashed");
                }
                result
            }
            Finished::TimedOut(timeout) => {
                tracing::warn!(
                    plugin = %self.plugin.path.display(),
                    "tool {name} ran past its timeout of {}; abandoning the call (its thread keeps running) and recreating the instance",
                    seconds(timeout)
                );
                self.recreate_after(slot, generation, "timed out");
                Err(format!(
                    "{name} timed out after {}; the call was abandoned and the tool restarted",
                    seconds(timeout)
                ))
            }
            Finished::NoThread(e) => Err(format!("{name} could not be run: no thread: {e}")),
        };
        if let Err(message) = &result {
            tracing::debug!(plugin = %self.plugin.path.display(), "plugin call failed: {message}");
        }
        result.map_err(ToolError::new)
    }
}

#[cfg(test)]
mod tests {
    //! The host and guest halves of the ABI talking to each other inside this test binary: the
    //! descriptor is built by `ToolPluginV1::for_tool` exactly as `export_tool!` builds it, minus
    //! the shared library (the library path is covered by `tests/it`).

    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

    use super::*;
    use crate::abi::{ABI_VERSION, CallError, ImageRef, Reply, RgbImage, ToolImpl, Value};
    use deepeyes_core::PreprocessConfig;

    struct Good {
        calls: AtomicU64,
        busy: AtomicBool,
    }

    impl ToolImpl for Good {
        const NAME: &'static CStr = c"good_tool";

        fn spec() -> ToolSpec {
            ToolSpec {
                name: "good_tool".into(),
                description: "A well-behaved test tool.".into(),
                parameters: serde_json::json!({"type": "object", "properties": {"mode": {"type": "string"}}}),
            }
        }

        fn new(config: &Value) -> Result<Self, String> {
            if config.get("fail").is_some() {
                return Err("configured to fail".into());
            }
            if config.get("panic").is_some() {
                panic!("configured to panic");
            }
            Ok(Self {
                calls: AtomicU64::new(0),
                busy: AtomicBool::new(false),
            })
        }

        fn call(&self, args: &Value, image: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
            if self.busy.swap(true, Ordering::SeqCst) {
                return Err(CallError::Failed("two calls overlapped".into()));
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let result = match args["mode"].as_str() {
                Some("ok") => Ok(Reply::text(format!("call {n}"))),
                Some("panic") => {
                    self.busy.store(false, Ordering::SeqCst);
                    panic!("boom")
                }
                Some("text") => Ok(Reply::text(
                    "y".repeat(args["bytes"].as_u64().unwrap_or(0) as usize),
                )),
                Some("image") => {
                    let side = args["side"].as_u64().unwrap_or(4) as u32;
                    Ok(Reply::image(RgbImage::new(side, side)))
                }
                Some("echo") => {
                    let im = image.ok_or_else(|| CallError::Failed("no image".into()))?;
                    Ok(Reply::image(im.to_rgb_image()).with_text(format!("{:?}", im.pixel(1, 0))))
                }
                Some("slow") => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    Ok(Reply::default())
                }
                Some("bad") => Err(CallError::BadArguments("bad mode".into())),
                Some("unsupported") => Err(CallError::Unsupported("not here".into())),
                _ => Err(CallError::Failed("failed".into())),
            };
            self.busy.store(false, Ordering::SeqCst);
            result
        }
    }

    fn path() -> PathBuf {
        PathBuf::from("/in-process/good_tool.so")
    }

    fn from_desc(desc: &ToolPluginV1) -> Result<Arc<LoadedPlugin>, PluginError> {
        // SAFETY: `desc` outlives the call and its functions are compiled into this test binary.
        unsafe { LoadedPlugin::from_descriptor(path(), None, ABI_VERSION, desc) }.map(Arc::new)
    }

    fn load<T: ToolImpl>() -> Arc<LoadedPlugin> {
        from_desc(&ToolPluginV1::for_tool::<T>(c"9.9.9")).unwrap()
    }

    fn run(tool: &DynTool, args: Value) -> Result<ToolOutput, ToolError> {
        let images = [Image::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap()];
        let pre = PreprocessConfig::default();
        tool.call(
            &args,
            &ToolContext {
                original_images: &images,
                preprocess: &pre,
            },
        )
    }

    #[test]
    fn describe_create_call_round_trip() {
        let plugin = load::<Good>();
        assert_eq!(plugin.name(), "good_tool");
        assert_eq!(plugin.plugin_version(), "9.9.9");
        assert_eq!(plugin.abi_version(), (1, 0));
        assert!(!plugin.thread_safe());
        assert_eq!(*plugin.spec(), Good::spec());
        let tool = plugin
            .instantiate(&Value::Null, PluginLimits::default())
            .unwrap();
        assert_eq!(tool.spec(), Good::spec());
        let out = run(&tool, serde_json::json!({"mode": "ok"})).unwrap();
        assert_eq!(out.text.as_deref(), Some("call 1"));
        let out = run(&tool, serde_json::json!({"mode": "echo"})).unwrap();
        assert_eq!(out.text.as_deref(), Some("[4, 5, 6]"));
        assert_eq!(out.images[0].as_raw(), &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn statuses_become_tool_errors() {
        let tool = load::<Good>()
            .instantiate(&Value::Null, PluginLimits::default())
            .unwrap();
        for (mode, needle) in [
            ("bad", "invalid arguments for good_tool: bad mode"),
            ("unsupported", "good_tool does not support this: not here"),
            ("other", "failed"),
        ] {
            let err = run(&tool, serde_json::json!({ "mode": mode })).unwrap_err();
            assert_eq!(err.message, needle);
        }
    }

    #[test]
    fn a_panic_is_an_error_and_the_instance_is_recreated() {
        let tool = load::<Good>()
            .instantiate(&Value::Null, PluginLimits::default())
            .unwrap();
        run(&tool, serde_json::json!({"mode": "ok"})).unwrap();
        let err = run(&tool, serde_json::json!({"mode": "panic"})).unwrap_err();
        assert_eq!(err.message, "good_tool crashed: the tool panicked: boom");
        assert_eq!(tool.restarts(), 1);
        // A fresh instance: its call counter starts again.
        let out = run(&tool, serde_json::json!({"mode": "ok"})).unwrap();
        assert_eq!(out.text.as_deref(), Some("call 1"));
    }

    #[test]
    fn oversized_outputs_are_refused() {
        let limits = PluginLimits {
            max_text_bytes: 100,
            max_image_pixels: 64,
        };
        let tool = load::<Good>().instantiate(&Value::Null, limits).unwrap();
        assert!(run(&tool, serde_json::json!({"mode": "text", "bytes": 100})).is_ok());
        let err = run(&tool, serde_json::json!({"mode": "text", "bytes": 101})).unwrap_err();
        assert!(
            err.message.contains("too large") && err.message.contains("101 bytes"),
            "{err}"
        );
        assert!(run(&tool, serde_json::json!({"mode": "image", "side": 8})).is_ok());
        let err = run(&tool, serde_json::json!({"mode": "image", "side": 9})).unwrap_err();
        assert!(err.message.contains("81 pixels"), "{err}");
    }

    #[test]
    fn create_failures_name_the_plugin() {
        let plugin = load::<Good>();
        let err = plugin
            .instantiate(&serde_json::json!({"fail": true}), PluginLimits::default())
            .unwrap_err();
        assert!(matches!(err, PluginError::Create { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("good_tool.so") && msg.contains("configured to fail"),
            "{msg}"
        );
        let msg = plugin
            .instantiate(&serde_json::json!({"panic": true}), PluginLimits::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("panicked: configured to panic"), "{msg}");
    }

    #[test]
    fn calls_of_non_thread_safe_plugins_never_overlap() {
        let tool = Arc::new(
            load::<Good>()
                .instantiate(&Value::Null, PluginLimits::default())
                .unwrap(),
        );
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let tool = Arc::clone(&tool);
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        run(&tool, serde_json::json!({"mode": "slow"})).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    static LIVE: AtomicI64 = AtomicI64::new(0);

    struct Counted;

    impl Drop for Counted {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl ToolImpl for Counted {
        const NAME: &'static CStr = c"counted_tool";
        const THREAD_SAFE: bool = true;

        fn spec() -> ToolSpec {
            ToolSpec {
                name: "counted_tool".into(),
                description: "Counts its live instances.".into(),
                parameters: serde_json::json!({"type": "object"}),
            }
        }

        fn new(_: &Value) -> Result<Self, String> {
            LIVE.fetch_add(1, Ordering::SeqCst);
            Ok(Self)
        }

        fn call(&self, args: &Value, _: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
            if args.get("panic").is_some() {
                panic!("counted panic");
            }
            Ok(Reply::text("x").with_text("counted"))
        }
    }

    #[test]
    fn create_call_destroy_loop_releases_every_instance() {
        let plugin = load::<Counted>();
        assert!(plugin.thread_safe());
        for i in 0..200 {
            let tool = plugin
                .instantiate(&Value::Null, PluginLimits::default())
                .unwrap();
            assert_eq!(
                run(&tool, serde_json::json!({})).unwrap().text.as_deref(),
                Some("counted")
            );
            if i % 10 == 0 {
                assert!(run(&tool, serde_json::json!({"panic": true})).is_err());
            }
        }
        assert_eq!(LIVE.load(Ordering::SeqCst), 0);
    }

    struct Misnamed;

    impl ToolImpl for Misnamed {
        const NAME: &'static CStr = c"one_name";

        fn spec() -> ToolSpec {
            ToolSpec {
                name: "another_name".into(),
                description: "d".into(),
                parameters: serde_json::json!({"type": "object"}),
            }
        }

        fn new(_: &Value) -> Result<Self, String> {
            Ok(Self)
        }

        fn call(&self, _: &Value, _: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
            Ok(Reply::default())
        }
    }

    struct NotASchema;

    impl ToolImpl for NotASchema {
        const NAME: &'static CStr = c"not_a_schema";

        fn spec() -> ToolSpec {
            ToolSpec {
                name: "not_a_schema".into(),
                description: "d".into(),
                parameters: serde_json::json!(["bbox"]),
            }
        }

        fn new(_: &Value) -> Result<Self, String> {
            Ok(Self)
        }

        fn call(&self, _: &Value, _: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
            Ok(Reply::default())
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        let err = from_desc(&ToolPluginV1::for_tool::<Misnamed>(c"1")).unwrap_err();
        assert!(matches!(err, PluginError::BadSpec { .. }), "{err}");
        assert!(err.to_string().contains("another_name"), "{err}");
        let err = from_desc(&ToolPluginV1::for_tool::<NotASchema>(c"1")).unwrap_err();
        assert!(err.to_string().contains("JSON schema object"), "{err}");
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let check = |desc: ToolPluginV1, needle: &str| {
            let err = from_desc(&desc).unwrap_err();
            assert!(matches!(err, PluginError::BadDescriptor { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(needle) && msg.contains("good_tool.so"),
                "{msg}"
            );
        };
        let good = || ToolPluginV1::for_tool::<Good>(c"1");
        check(
            ToolPluginV1 {
                struct_size: 16,
                ..good()
            },
            "struct_size is 16",
        );
        check(
            ToolPluginV1 {
                abi_version: 0x1_0001,
                ..good()
            },
            "disagrees",
        );
        check(ToolPluginV1 { flags: 6, ..good() }, "unknown flags");
        check(
            ToolPluginV1 {
                name: std::ptr::null(),
                ..good()
            },
            "name is a null pointer",
        );
        check(
            ToolPluginV1 {
                call: None,
                ..good()
            },
            "`call` is null",
        );
        // SAFETY: a null descriptor is refused before anything is read.
        let err =
            unsafe { LoadedPlugin::from_descriptor(path(), None, ABI_VERSION, std::ptr::null()) }
                .unwrap_err();
        assert!(err.to_string().contains("null descriptor"), "{err}");
    }

    #[test]
    fn missing_files_and_non_libraries_are_named() {
        let err = LoadedPlugin::load("/definitely/not/here.so").unwrap_err();
        assert!(matches!(err, PluginError::NotFound { .. }));
        assert!(err.to_string().contains("/definitely/not/here.so"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libfake.so");
        std::fs::write(&fake, b"this is not an ELF file").unwrap();
        let err = LoadedPlugin::load(&fake).unwrap_err();
        assert!(matches!(err, PluginError::Open { .. }), "{err}");
        assert!(err.to_string().contains("libfake.so"), "{err}");
        let err = LoadedPlugin::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
