//! `crashing_tool`, a test-only plugin that does what no panic guard can catch, on demand: the
//! call's `mode` argument picks a segfault, an abort, a hang, a sleep of `ms` milliseconds, or an
//! allocation that grows until memory runs out. `ok` answers with the instance's call count and
//! the process id, so tests can see an instance or a process was replaced.

// A segfault needs a raw null-pointer read, which the workspace's `unsafe_code` lint flags.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deepeyes_tools::abi::{CallError, ImageRef, Reply, ToolImpl, ToolSpec, Value, serde_json};

/// The tool; counts its calls.
#[derive(Debug)]
pub struct Crashing {
    calls: AtomicU64,
}

/// Allocates and touches 16 MiB blocks until an allocation fails (Rust then aborts the process
/// with "memory allocation of … bytes failed").
fn allocate_without_bound() -> Reply {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(vec![1u8; 16 << 20]);
        std::hint::black_box(&blocks);
    }
}

impl ToolImpl for Crashing {
    const NAME: &'static std::ffi::CStr = c"crashing_tool";

    fn spec() -> ToolSpec {
        ToolSpec {
            name: "crashing_tool".into(),
            description: "Takes its process down as asked (test only).".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["ok", "segfault", "abort", "hang", "sleep", "allocate"]},
                    "ms": {"type": "integer"}
                },
                "required": ["mode"]
            }),
        }
    }

    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Self {
            calls: AtomicU64::new(0),
        })
    }

    fn call(&self, args: &Value, _image: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match args.get("mode").and_then(Value::as_str) {
            Some("ok") => Ok(Reply::text(format!(
                "call {n} in process {}",
                std::process::id()
            ))),
            Some("segfault") => {
                // SAFETY: none: reading the unmapped page at address 8 is the point (SIGSEGV).
                // Not address 0: debug builds check for null first and abort instead.
                let byte =
                    unsafe { std::ptr::read_volatile(std::ptr::with_exposed_provenance::<u8>(8)) };
                Ok(Reply::text(format!("read {byte}")))
            }
            Some("abort") => std::process::abort(),
            Some("hang") => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Some("sleep") => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                Ok(Reply::text(format!("slept {ms} ms")))
            }
            Some("allocate") => Ok(allocate_without_bound()),
            _ => Err(CallError::BadArguments(format!("unknown mode in {args}"))),
        }
    }
}

deepeyes_tools::export_tool!(Crashing);
