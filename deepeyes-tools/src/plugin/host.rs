//! The plugin-host process: the child side of [isolation](super::isolate).
//!
//! [`run`] serves one plugin on stdin/stdout: it reads `Init` (caps its own address space, then
//! loads the library and creates the instance with the ordinary in-process loader), then answers
//! `Call`s until its parent closes stdin or kills it. The `deepeyes` binary runs it as the hidden
//! subcommand `deepeyes plugin-host`; deepeyes-tools ships it as the `deepeyes-plugin-host`
//! binary; any program embedding deepeyes-tools can run it from its own `main` (and name itself
//! with [`PluginHost`](super::isolate::PluginHost)).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::process::ExitCode;

use deepeyes_core::{PreprocessConfig, Tool, ToolContext};

use super::wire::{self, PROTOCOL, Reply, Request};
use super::{DynTool, LoadedPlugin};

/// Largest request frame a host reads (a call's input image travels in one frame).
const MAX_REQUEST_BYTES: u64 = u32::MAX as u64;

/// Runs the plugin host on this process's stdin and stdout, until the parent closes stdin.
///
/// Frames go out on a private copy of stdout; file descriptor 1 is pointed at stderr first, so
/// whatever the plugin prints cannot corrupt the protocol. Returns failure when the parent sent
/// something this host cannot read or loading the plugin failed (after telling the parent why).
pub fn run() -> ExitCode {
    let output = match take_stdout() {
        Ok(file) => file,
        Err(e) => {
            tracing::error!("plugin host: cannot set up its output: {e}");
            return ExitCode::FAILURE;
        }
    };
    let input = BufReader::new(io::stdin().lock());
    match serve(input, BufWriter::new(output)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("plugin host: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves one plugin: `Init`, then calls until the end of `input`.
pub(crate) fn serve(mut input: impl Read, mut output: impl Write) -> io::Result<()> {
    let Some((request, _)) = wire::read_frame::<Request>(&mut input, MAX_REQUEST_BYTES)? else {
        return Ok(());
    };
    let tool = match init(request) {
        Ok((tool, ready)) => {
            wire::write_frame(&mut output, &ready, &[])?;
            tool
        }
        Err(message) => return Err(refuse(&mut output, message)),
    };
    let preprocess = PreprocessConfig::default();
    while let Some((request, tail)) = wire::read_frame::<Request>(&mut input, MAX_REQUEST_BYTES)? {
        let Request::Call { args, image } = request else {
            return Err(refuse(&mut output, "a second Init".to_string()));
        };
        let images = wire::split_images(image.as_slice(), &tail).map_err(io::Error::other)?;
        let ctx = ToolContext {
            original_images: &images,
            preprocess: &preprocess,
        };
        match tool.call(&args, &ctx) {
            Ok(out) => {
                let parts: Vec<_> = out.images.iter().map(wire::image_part).collect();
                let reply = Reply::Output {
                    text: out.text,
                    images: parts.iter().map(|(size, _)| *size).collect(),
                };
                let tail: Vec<&[u8]> = parts.iter().map(|(_, pixels)| *pixels).collect();
                wire::write_frame(&mut output, &reply, &tail)?;
            }
            Err(e) => wire::write_frame(&mut output, &Reply::Failed { message: e.message }, &[])?,
        }
    }
    Ok(())
}

/// Caps memory, loads the plugin and creates its instance.
/// Tells the parent that the host gives up, and why (a failure to tell it is reported instead),
/// as the error the host ends with.
fn refuse(output: &mut impl Write, message: String) -> io::Error {
    let reply = Reply::Failed {
        message: message.clone(),
    };
    match wire::write_frame(output, &reply, &[]) {
        Ok(()) => io::Error::other(message),
        Err(e) => e,
    }
}

fn init(request: Request) -> Result<(DynTool, Reply), String> {
    let Request::Init {
        protocol,
        path,
        config,
        limits,
        memory_limit_bytes,
    } = request
    else {
        return Err("the first request was not Init".into());
    };
    if protocol != PROTOCOL {
        return Err(format!(
            "the plugin host speaks protocol {PROTOCOL}, its parent {protocol}: use a host built from the same deepeyes-tools"
        ));
    }
    if let Some(bytes) = memory_limit_bytes {
        cap_address_space(bytes).map_err(|e| format!("cannot set the memory cap: {e}"))?;
    }
    let plugin = LoadedPlugin::load(&path).map_err(|e| e.to_string())?;
    // The parent enforces the timeout by killing this process, so calls run on this thread:
    // no extra thread (and no extra malloc arena under the memory cap).
    let tool = plugin
        .instantiate(&config, limits)
        .map_err(|e| e.to_string())?
        .with_timeout(None);
    let ready = Reply::Ready {
        protocol: PROTOCOL,
        name: plugin.name().to_string(),
        plugin_version: plugin.plugin_version().to_string(),
        abi: plugin.abi_version(),
        spec: plugin.spec().clone(),
    };
    Ok((tool, ready))
}

/// A private copy of stdout for the frames; fd 1 then points at stderr.
#[cfg(unix)]
fn take_stdout() -> io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC duplicates fd 1 (open for the whole process) to a new descriptor,
    // closed on exec so that programs the plugin runs do not inherit the protocol pipe.
    let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: points fd 1 at what fd 2 is; both are open; nothing in this process holds a Rust
    // handle that owns fd 1 (std's stdout only borrows it).
    if unsafe { libc::dup2(2, 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by fcntl and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(not(unix))]
fn take_stdout() -> io::Result<File> {
    Err(io::Error::other("plugin isolation needs a Unix system"))
}

/// Caps this process's address space (RLIMIT_AS, soft and hard) at `bytes`, or at the hard
/// limit already in force when that is lower.
#[cfg(unix)]
fn cap_address_space(bytes: u64) -> io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cap = (bytes as libc::rlim_t).min(current.rlim_max);
    let limit = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(unix))]
fn cap_address_space(_bytes: u64) -> io::Result<()> {
    Err(io::Error::other("memory caps need a Unix system"))
}
