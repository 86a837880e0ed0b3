//! The plugin side of the ABI: the `extern "C"` functions [`export_tool!`](crate::export_tool)
//! puts in a plugin's descriptor. They are generic over the tool type and monomorphized inside
//! the plugin, so they run with the plugin's allocator and panic runtime.
//!
//! Each one validates the raw pointers the host passes, runs the tool's safe code under
//! `catch_unwind`, and writes its result into the host's [`AbiToolOutput`] only once the tool has
//! returned, so a panic never leaves a half-written output behind.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{
    AbiImageView, AbiToolOutput, CallError, FORMAT_RGB8, ImageRef, Reply, STATUS_BAD_ARGS,
    STATUS_OK, STATUS_PANIC, ToolImpl, Value,
};
use crate::abi::AbiBuffer;

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs `f` under `catch_unwind` and writes its outcome into `out`. Returns the status.
fn guarded(out: *mut AbiToolOutput, f: impl FnOnce() -> Result<Reply, CallError>) -> i32 {
    let (status, output) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(reply)) => (STATUS_OK, reply.into_abi()),
        Ok(Err(err)) => (err.status(), error_output(err.message())),
        Err(payload) => {
            let message = panic_message(&*payload);
            // Dropping a payload can itself panic; leaking it is harmless.
            std::mem::forget(payload);
            (
                STATUS_PANIC,
                error_output(&format!("the tool panicked: {message}")),
            )
        }
    };
    if out.is_null() {
        let mut output = output;
        release(&mut output);
        return STATUS_BAD_ARGS;
    }
    // SAFETY: `out` is non-null and, by the ABI contract, points to an `AbiToolOutput` the host
    // owns and lent us for this call, properly aligned and writable. Its previous contents are
    // plain data the host zero-initialised, so overwriting without dropping leaks nothing.
    unsafe { out.write(output) };
    status
}

fn error_output(message: &str) -> AbiToolOutput {
    let mut out = AbiToolOutput::EMPTY;
    out.error = AbiBuffer::from_vec(message.as_bytes().to_vec());
    out
}

/// Frees the buffers of an output this binary allocated.
fn release(out: &mut AbiToolOutput) {
    for buf in [&mut out.text, &mut out.error, &mut out.image] {
        // SAFETY: every buffer in an output is either absent or made by `AbiBuffer::from_vec` in
        // this binary (see `Reply::into_abi` and `error_output`), and `take_vec` empties it so it
        // is released at most once.
        drop(unsafe { buf.take_vec() });
    }
    out.image_width = 0;
    out.image_height = 0;
}

/// Borrows `len` bytes at `ptr` (null or zero length: empty).
///
/// # Safety
/// When non-null, `ptr` must be valid for reads of `len` bytes for the returned lifetime.
unsafe fn borrowed_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller (the host lends `len` readable bytes for the call).
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// `describe` of tool `T`.
///
/// # Safety
/// `out` must be null or point to a writable [`AbiToolOutput`].
pub unsafe extern "C" fn describe<T: ToolImpl>(out: *mut AbiToolOutput) -> i32 {
    guarded(out, || {
        let spec = T::spec();
        serde_json::to_string(&spec)
            .map(Reply::text)
            .map_err(|e| CallError::Failed(format!("cannot serialise the tool spec: {e}")))
    })
}

/// `create` of tool `T`.
///
/// # Safety
/// `config` must be null or valid for reads of `config_len` bytes; `instance` must be null or
/// point to a writable pointer slot; `out` must be null or point to a writable
/// [`AbiToolOutput`].
pub unsafe extern "C" fn create<T: ToolImpl>(
    config: *const u8,
    config_len: usize,
    instance: *mut *mut c_void,
    out: *mut AbiToolOutput,
) -> i32 {
    guarded(out, || {
        if instance.is_null() {
            return Err(CallError::BadArguments("no slot for the instance".into()));
        }
        // SAFETY: the host lends `config_len` readable bytes at `config` for this call.
        let bytes = unsafe { borrowed_bytes(config, config_len) };
        let config: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(bytes).map_err(|e| {
                CallError::BadArguments(format!("the plugin configuration is not valid JSON: {e}"))
            })?
        };
        let tool = T::new(&config).map_err(CallError::Failed)?;
        let ptr = Box::into_raw(Box::new(tool)).cast::<c_void>();
        // SAFETY: `instance` is non-null and points to a pointer slot the host owns.
        unsafe { instance.write(ptr) };
        Ok(Reply::default())
    })
}

/// `destroy` of tool `T`.
///
/// # Safety
/// `instance` must be null or a pointer returned by `create::<T>` of this plugin that has not
/// been destroyed yet, and no call may be running on it.
pub unsafe extern "C" fn destroy<T: ToolImpl>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` came from `Box::into_raw(Box<T>)` in `create::<T>` and ownership
        // returns here exactly once (the caller's contract).
        drop(unsafe { Box::from_raw(instance.cast::<T>()) });
    }));
    if let Err(payload) = result {
        std::mem::forget(payload);
    }
}

/// `call` of tool `T`.
///
/// # Safety
/// `instance` must be a live pointer from `create::<T>`; `args` must be valid for reads of
/// `args_len` bytes; `image` must be null or point to a valid [`AbiImageView`] whose pixels stay
/// readable for the call; `out` must be null or point to a writable [`AbiToolOutput`]. Unless
/// `T::THREAD_SAFE`, calls on one instance must not overlap.
pub unsafe extern "C" fn call<T: ToolImpl>(
    instance: *mut c_void,
    args: *const u8,
    args_len: usize,
    image: *const AbiImageView,
    out: *mut AbiToolOutput,
) -> i32 {
    guarded(out, || {
        if instance.is_null() {
            return Err(CallError::Failed("the tool has no instance".into()));
        }
        // SAFETY: `instance` is a live `Box<T>` from `create::<T>`; `T: Sync`, so a shared
        // reference is sound even when a thread-safe plugin's calls overlap.
        let tool = unsafe { &*instance.cast::<T>() };
        // SAFETY: the host lends `args_len` readable bytes at `args` for this call.
        let bytes = unsafe { borrowed_bytes(args, args_len) };
        let args: Value = serde_json::from_slice(bytes).map_err(|e| {
            CallError::BadArguments(format!("the arguments are not valid JSON: {e}"))
        })?;
        let image = if image.is_null() {
            None
        } else {
            // SAFETY: non-null, and the host lends a valid view for the duration of the call.
            let view = unsafe { *image };
            if view.format != FORMAT_RGB8 {
                return Err(CallError::Unsupported(format!(
                    "image format {} (only RGB8 is supported)",
                    view.format
                )));
            }
            // SAFETY: the view promises `len` readable bytes at `ptr` for the call.
            let pixels = unsafe { borrowed_bytes(view.ptr, view.len) };
            Some(
                ImageRef::new(view.width, view.height, view.stride, pixels)
                    .map_err(|e| CallError::BadArguments(format!("input image: {e}")))?,
            )
        };
        tool.call(&args, image)
    })
}

/// `free_output`: releases the buffers this plugin put in an output.
///
/// # Safety
/// `out` must be null or point to an [`AbiToolOutput`] filled by this plugin and not freed
/// since.
pub unsafe extern "C" fn free_output(out: *mut AbiToolOutput) {
    if out.is_null() {
        return;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: non-null, points to an output this plugin filled (caller's contract); the host
        // gives us exclusive access for the call.
        release(unsafe { &mut *out });
    }));
    if let Err(payload) = result {
        std::mem::forget(payload);
    }
}
