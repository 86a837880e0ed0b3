//! Out-of-process plugins (`isolate = true`): the plugin runs in a child process, so a segfault,
//! an abort, a hang or a runaway allocation kills only the child.
//!
//! The child is a plugin host ([`host::run`](super::host::run)): the `deepeyes` binary's hidden
//! `plugin-host` subcommand, the `deepeyes-plugin-host` binary of this crate, or any program that
//! calls `deepeyes_tools::plugin::host::run()`. It caps its address space (RLIMIT_AS), loads the
//! library with the same checks as in process, and exchanges the ABI's data with the parent as
//! length-prefixed frames on its stdin and stdout ([`wire`](super::wire)). A call that does not
//! answer within the timeout gets the child killed; a child that dies (signal, exit, memory cap)
//! is reaped. Either way the call returns a tool error naming the tool and what happened, and the
//! next call starts a fresh child. Calls of one isolated tool run one at a time (one child per
//! tool); each costs a round trip through a pipe (the input image is copied to the child).
//!
//! Which program is the host ([`PluginHost::resolve`]): the `DEEPEYES_PLUGIN_HOST` environment
//! variable, else what the program set with [`PluginHost::set_default`] (the `deepeyes` CLI sets
//! itself), else `deepeyes-plugin-host` next to the running executable, else
//! `deepeyes-plugin-host` on `PATH` (`cargo install deepeyes-tools --bin deepeyes-plugin-host`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::Duration;

use deepeyes_core::{Tool, ToolContext, ToolError, ToolOutput, ToolSpec};

use super::wire::{self, PROTOCOL, Reply, Request};
use super::{DEFAULT_CALL_TIMEOUT, PluginError, PluginLimits, resolve_path, seconds};
use crate::registry::validate_tool_name;

/// The program run as a plugin host, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginHost {
    program: PathBuf,
    args: Vec<OsString>,
}

/// What [`PluginHost::set_default`] set.
static DEFAULT_HOST: RwLock<Option<PluginHost>> = RwLock::new(None);

impl PluginHost {
    /// The environment variable naming the host program (it takes no arguments).
    pub const ENV: &'static str = "DEEPEYES_PLUGIN_HOST";
    /// The name of this crate's host binary.
    pub const BINARY: &'static str = "deepeyes-plugin-host";

    /// `program`, run with no arguments.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Adds an argument (the CLI runs `deepeyes plugin-host`).
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Makes `host` the host of every isolated plugin of this process that names none (unless
    /// `DEEPEYES_PLUGIN_HOST` is set). A program whose `main` runs
    /// [`host::run`](super::host::run) when given some argument sets itself here.
    pub fn set_default(host: Self) {
        *DEFAULT_HOST.write().unwrap_or_else(PoisonError::into_inner) = Some(host);
    }

    /// The host to use: `DEEPEYES_PLUGIN_HOST`, else the default set, else
    /// `deepeyes-plugin-host` next to the running executable, else on `PATH`.
    pub fn resolve() -> Self {
        if let Some(program) = std::env::var_os(Self::ENV).filter(|p| !p.is_empty()) {
            return Self::new(program);
        }
        if let Some(host) = DEFAULT_HOST
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return host;
        }
        let file = format!("{}{}", Self::BINARY, std::env::consts::EXE_SUFFIX);
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(&file)))
            .filter(|p| p.is_file());
        Self::new(sibling.unwrap_or_else(|| PathBuf::from(file)))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// How an isolated plugin runs.
#[derive(Debug, Clone)]
pub struct IsolateOptions {
    /// Limits on a call's outputs (checked in the child, and again here).
    pub limits: PluginLimits,
    /// The longest a call (or starting the child) may take before the child is killed.
    pub timeout: Duration,
    /// The child's address-space cap in bytes (`None`: none).
    pub memory_limit_bytes: Option<u64>,
    /// The host program (`None`: [`PluginHost::resolve`]).
    pub host: Option<PluginHost>,
}

impl Default for IsolateOptions {
    fn default() -> Self {
        Self {
            limits: PluginLimits::default(),
            timeout: DEFAULT_CALL_TIMEOUT,
            memory_limit_bytes: Some(DEFAULT_MEMORY_LIMIT_MIB << 20),
            host: None,
        }
    }
}

/// The default address-space cap of a plugin host, in MiB.
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 4096;

/// How much of a child's stderr is kept to explain its death.
const STDERR_TAIL_BYTES: usize = 8 << 10;

/// What Rust's allocator prints before it aborts on a failed allocation.
const ALLOCATION_FAILED: &str = "memory allocation of ";

/// The last lines a child wrote to stderr, and whether it closed it.
#[derive(Debug, Default)]
struct StderrTail {
    state: Mutex<(String, bool)>,
    closed: Condvar,
}

impl StderrTail {
    /// Forwards `stderr` to the log line by line, keeping its tail, until it closes.
    fn follow(&self, stderr: impl Read, plugin: &Path) {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            tracing::info!(plugin = %plugin.display(), "plugin host: {text}");
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.0.push_str(text);
            state.0.push('\n');
            if state.0.len() > STDERR_TAIL_BYTES {
                let mut cut = state.0.len() - STDERR_TAIL_BYTES;
                while !state.0.is_char_boundary(cut) {
                    cut += 1;
                }
                state.0.drain(..cut);
            }
            line.clear();
        }
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.closed.notify_all();
    }

    /// The tail, once stderr closed or `wait` passed.
    fn text(&self, wait: Duration) -> String {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (state, _) = self
            .closed
            .wait_timeout_while(state, wait, |s| !s.1)
            .unwrap_or_else(PoisonError::into_inner);
        state.0.clone()
    }
}

/// A frame from the child, or why there is none.
type Frame = std::io::Result<Option<(Reply, Vec<u8>)>>;

/// A running plugin host.
#[derive(Debug)]
struct HostProcess {
    process: Child,
    stdin: ChildStdin,
    replies: Receiver<Frame>,
    stderr: Arc<StderrTail>,
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Why an exchange with a child failed; the child is dead (reaped) in every case.
#[derive(Debug)]
enum Failure {
    TimedOut(Duration),
    Died { status: String, stderr: String },
    Protocol(String),
}

/// The tail of stderr up to the last line that mentions a failed allocation, if one does.
fn allocation_failure(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .rev()
        .find(|l| l.contains(ALLOCATION_FAILED))
        .map(str::trim)
}

/// `killed by signal 11 (SIGSEGV)` or `exited with status 3`.
fn exit_description(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return match signal_name(signal) {
                Some(name) => format!("killed by signal {signal} ({name})"),
                None => format!("killed by signal {signal}"),
            };
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended ({status})"),
    }
}

#[cfg(unix)]
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        libc::SIGTRAP => "SIGTRAP",
        _ => return None,
    })
}

/// What `Ready` told about the plugin.
#[derive(Debug, Clone)]
struct Identity {
    name: String,
    plugin_version: String,
    abi: (u32, u32),
    spec: ToolSpec,
}

/// A plugin tool running in a child process, behind the safe [`Tool`] trait. See the
/// [module](self) documentation.
#[derive(Debug)]
pub struct IsolatedTool {
    launcher: Launcher,
    identity: Identity,
    child: Mutex<Option<HostProcess>>,
    restarts: AtomicU64,
}

/// What it takes to start a plugin host for one plugin.
#[derive(Debug)]
struct Launcher {
    path: PathBuf,
    config: serde_json::Value,
    options: IsolateOptions,
    host: PluginHost,
}

impl IsolatedTool {
    /// Starts a plugin host for the plugin at `path`, which loads it and creates its instance
    /// with `config`. Fails with the loader's error (as in process) or the host's.
    pub fn start(
        path: impl AsRef<Path>,
        config: &serde_json::Value,
        options: IsolateOptions,
    ) -> Result<Self, PluginError> {
        let launcher = Launcher {
            path: resolve_path(path.as_ref())?,
            config: config.clone(),
            host: options.host.clone().unwrap_or_else(PluginHost::resolve),
            options,
        };
        let (child, identity) = launcher.launch()?;
        tracing::info!(
            path = %launcher.path.display(),
            tool = %identity.name,
            host = %launcher.host.program.display(),
            "started isolated tool plugin"
        );
        Ok(Self {
            launcher,
            identity,
            child: Mutex::new(Some(child)),
            restarts: AtomicU64::new(0),
        })
    }

    /// The absolute path of the plugin library.
    pub fn path(&self) -> &Path {
        &self.launcher.path
    }

    /// The plugin's own version string.
    pub fn plugin_version(&self) -> &str {
        &self.identity.plugin_version
    }

    /// The ABI version `(major, minor)` the plugin was built for.
    pub fn abi_version(&self) -> (u32, u32) {
        self.identity.abi
    }

    /// How many times a child was started again after one died or was killed.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// The process id of the running child, if one runs.
    pub fn child_id(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|c| c.process.id())
    }

    /// Restarts the child after a failure; the error text says why that failed.
    fn restart(&self) -> Result<HostProcess, String> {
        let (child, identity) = self.launcher.launch().map_err(|e| e.to_string())?;
        if identity.name != self.identity.name {
            return Err(format!(
                "the restarted plugin names itself '{}', not '{}'",
                identity.name, self.identity.name
            ));
        }
        self.restarts.fetch_add(1, Ordering::SeqCst);
        tracing::info!(path = %self.path().display(), "restarted the plugin host");
        Ok(child)
    }

    /// Checks a call's output against the limits and builds it.
    fn output(
        &self,
        text: Option<String>,
        images: &[wire::ImageSize],
        tail: &[u8],
    ) -> Result<ToolOutput, String> {
        let name = &self.identity.name;
        let limits = self.launcher.options.limits;
        if let Some(text) = &text
            && text.len() > limits.max_text_bytes
        {
            return Err(format!(
                "{name} returned an output that is too large: its text output is {} bytes, over the limit of {} bytes",
                text.len(),
                limits.max_text_bytes
            ));
        }
        if let Some(big) = images
            .iter()
            .find(|s| u64::from(s.width) * u64::from(s.height) > limits.max_image_pixels)
        {
            return Err(format!(
                "{name} returned an image that is too large: {}×{}, over the limit of {} pixels",
                big.width, big.height, limits.max_image_pixels
            ));
        }
        let images =
            wire::split_images(images, tail).map_err(|e| format!("{name} returned {e}"))?;
        Ok(ToolOutput {
            text,
            images,
            region: None,
        })
    }

    /// The observation for a call whose child died or was killed.
    fn failure_message(&self, failure: &Failure) -> String {
        let name = &self.identity.name;
        let what = failure_text(failure, self.launcher.options.memory_limit_bytes);
        let head = match failure {
            Failure::TimedOut(_) => "timed out",
            Failure::Died { stderr, .. } if allocation_failure(stderr).is_some() => {
                "ran out of memory"
            }
            Failure::Died { .. } => "crashed",
            Failure::Protocol(_) => "failed",
        };
        format!("{name} {head}: its plugin process {what}; it is restarted for the next call")
    }
}

impl Launcher {
    fn host_error(&self, reason: impl Into<String>) -> PluginError {
        PluginError::Host {
            path: self.path.clone(),
            host: self.host.program.clone(),
            reason: reason.into(),
        }
    }

    /// Largest reply frame accepted: the output limits (text possibly escaped in JSON) plus
    /// room for the header.
    fn max_reply_bytes(&self) -> u64 {
        let limits = self.options.limits;
        (limits.max_text_bytes as u64)
            .saturating_mul(6)
            .saturating_add(limits.max_image_pixels.saturating_mul(3))
            .saturating_add(4 << 20)
            .min(u64::from(u32::MAX))
    }

    /// Starts a child and has it load the plugin.
    fn launch(&self) -> Result<(HostProcess, Identity), PluginError> {
        let mut child = self.spawn()?;
        let init = Request::Init {
            protocol: PROTOCOL,
            path: self.path.clone(),
            config: self.config.clone(),
            limits: self.options.limits,
            memory_limit_bytes: self.options.memory_limit_bytes,
        };
        let reply = exchange(&mut child, &init, &[], self.options.timeout).map_err(|f| {
            self.host_error(format!(
                "while loading the plugin, it {}",
                failure_text(&f, self.options.memory_limit_bytes)
            ))
        })?;
        match reply {
            (
                Reply::Ready {
                    protocol,
                    name,
                    plugin_version,
                    abi,
                    spec,
                },
                _,
            ) => {
                if protocol != PROTOCOL {
                    return Err(self.host_error(format!(
                        "it speaks protocol {protocol}, this library {PROTOCOL}"
                    )));
                }
                validate_tool_name(&name).map_err(|e| self.host_error(e))?;
                let identity = Identity {
                    name,
                    plugin_version,
                    abi,
                    spec,
                };
                Ok((child, identity))
            }
            (Reply::Failed { message }, _) => Err(PluginError::InHost {
                path: self.path.clone(),
                message,
            }),
            (other, _) => Err(self.host_error(format!("it answered Init with {other:?}"))),
        }
    }

    fn spawn(&self) -> Result<HostProcess, PluginError> {
        let mut process = self.host.command().spawn().map_err(|e| {
            self.host_error(format!(
                "cannot start it: {e} (name the host with {} or PluginHost::set_default, or install it: cargo install deepeyes-tools --bin {})",
                PluginHost::ENV,
                PluginHost::BINARY
            ))
        })?;
        let (Some(stdin), Some(mut stdout), Some(stderr_pipe)) = (
            process.stdin.take(),
            process.stdout.take(),
            process.stderr.take(),
        ) else {
            return Err(self.host_error("its pipes were not set up"));
        };
        let (tx, replies) = std::sync::mpsc::channel();
        let max = self.max_reply_bytes();
        let reader = std::thread::Builder::new()
            .name("plugin host reader".into())
            .spawn(move || {
                loop {
                    let frame = wire::read_frame::<Reply>(&mut stdout, max);
                    let more = matches!(frame, Ok(Some(_)));
                    if tx.send(frame).is_err() || !more {
                        break;
                    }
                }
            });
        let stderr = Arc::new(StderrTail::default());
        let tail = Arc::clone(&stderr);
        let plugin = self.path.clone();
        let follower = std::thread::Builder::new()
            .name("plugin host stderr".into())
            .spawn(move || tail.follow(stderr_pipe, &plugin));
        let child = HostProcess {
            process,
            stdin,
            replies,
            stderr,
        };
        reader
            .and(follower)
            .map_err(|e| self.host_error(format!("no thread to read it: {e}")))?;
        Ok(child)
    }
}

/// What happened to a child, as a clause: "was killed by signal 11 (SIGSEGV)".
fn failure_text(failure: &Failure, memory_limit_bytes: Option<u64>) -> String {
    match failure {
        Failure::TimedOut(t) => format!("did not answer within {} and was killed", seconds(*t)),
        Failure::Died { status, stderr } => match allocation_failure(stderr) {
            Some(line) => {
                let cap = memory_limit_bytes
                    .map(|b| format!("its memory cap of {} MiB", b >> 20))
                    .unwrap_or_else(|| "the memory available".into());
                format!("hit {cap} ({line}) and was {status}")
            }
            None => format!("was {status}"),
        },
        Failure::Protocol(e) => format!("sent something unreadable ({e}) and was killed"),
    }
}

/// Sends one request and waits up to `timeout` for its reply. On any failure the child is
/// killed and reaped before this returns.
fn exchange(
    child: &mut HostProcess,
    request: &Request,
    tail: &[&[u8]],
    timeout: Duration,
) -> Result<(Reply, Vec<u8>), Failure> {
    // The child reads every frame in full before working on it, so this write does not block
    // on a busy child; if the child is dead it fails (EPIPE) and its status tells why.
    let written = wire::write_frame(&mut child.stdin, request, tail);
    let frame = match written {
        Ok(()) => child.replies.recv_timeout(timeout),
        Err(_) => Err(RecvTimeoutError::Disconnected),
    };
    match frame {
        Ok(Ok(Some(reply))) => Ok(reply),
        Ok(Err(e)) => {
            let _ = child.process.kill();
            let _ = child.process.wait();
            Err(Failure::Protocol(e.to_string()))
        }
        Err(RecvTimeoutError::Timeout) => {
            let _ = child.process.kill();
            let _ = child.process.wait();
            Err(Failure::TimedOut(timeout))
        }
        Ok(Ok(None)) | Err(RecvTimeoutError::Disconnected) => {
            let status = child.process.wait();
            let status = match status {
                Ok(status) => exit_description(status),
                Err(e) => format!("lost ({e})"),
            };
            // The child is gone; its stderr closes right after (give a grandchild holding it
            // open a moment, no more).
            let stderr = child.stderr.text(Duration::from_millis(500));
            Err(Failure::Died { status, stderr })
        }
    }
}

impl Tool for IsolatedTool {
    fn spec(&self) -> ToolSpec {
        self.identity.spec.clone()
    }

    fn name(&self) -> String {
        self.identity.name.clone()
    }

    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> Result<ToolOutput, ToolError> {
        let name = &self.identity.name;
        let mut slot = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let child = match slot.as_mut() {
            Some(child) => child,
            None => {
                let child = self.restart().map_err(|e| {
                    ToolError::new(format!(
                        "{name} is unavailable: its plugin process could not be restarted: {e}"
                    ))
                })?;
                slot.insert(child)
            }
        };
        let image = ctx.original_images.first().map(wire::image_part);
        let request = Request::Call {
            args: args.clone(),
            image: image.map(|(size, _)| size),
        };
        let tail: Vec<&[u8]> = image.iter().map(|(_, pixels)| *pixels).collect();
        let result = match exchange(child, &request, &tail, self.launcher.options.timeout) {
            Ok((Reply::Output { text, images }, tail)) => self.output(text, &images, &tail),
            Ok((Reply::Failed { message }, _)) => Err(message),
            Ok((other, _)) => {
                *slot = None;
                Err(format!(
                    "{name} failed: its plugin process answered a call with {other:?}; it is restarted for the next call"
                ))
            }
            Err(failure) => {
                if let Failure::Died { stderr, .. } = &failure {
                    tracing::warn!(path = %self.path().display(), "the plugin host's last words:\n{stderr}");
                }
                *slot = None;
                let message = self.failure_message(&failure);
                tracing::warn!(path = %self.path().display(), "{message}");
                Err(message)
            }
        };
        result.map_err(ToolError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_what_happened() {
        let died = |status: &str, stderr: &str| Failure::Died {
            status: status.into(),
            stderr: stderr.into(),
        };
        assert_eq!(
            failure_text(&Failure::TimedOut(Duration::from_millis(500)), None),
            "did not answer within 0.5 s and was killed"
        );
        assert_eq!(
            failure_text(
                &died("killed by signal 11 (SIGSEGV)", "noise\n"),
                Some(1 << 30)
            ),
            "was killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            failure_text(
                &died(
                    "killed by signal 6 (SIGABRT)",
                    "hello\nmemory allocation of 16777216 bytes failed\n"
                ),
                Some(256 << 20)
            ),
            "hit its memory cap of 256 MiB (memory allocation of 16777216 bytes failed) and was killed by signal 6 (SIGABRT)"
        );
    }

    #[test]
    fn an_unstartable_host_is_named_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libx.so");
        std::fs::write(&lib, b"x").unwrap();
        let options = IsolateOptions {
            host: Some(PluginHost::new("/no/such/plugin-host")),
            ..IsolateOptions::default()
        };
        let err = IsolatedTool::start(&lib, &serde_json::Value::Null, options).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("libx.so")
                && msg.contains("/no/such/plugin-host")
                && msg.contains(PluginHost::ENV),
            "{msg}"
        );
    }
}
