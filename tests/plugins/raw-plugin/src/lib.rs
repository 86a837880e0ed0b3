//! `raw_tool`, a test-only plugin that implements the deepeyes tool C ABI by hand (without
//! `export_tool!`) in order to return what the safe API cannot express: text that is not UTF-8
//! (the default) or an image whose byte length disagrees with its size (`{"mode": "bad-image"}`).
//! It also shows the ABI is usable from plain C-style code.

// This crate writes the C ABI by hand: exported `no_mangle` functions that read and write
// through raw pointers. The workspace's `unsafe_code` lint is lifted for this test crate only.
#![allow(unsafe_code)]

use std::ffi::c_void;

use deepeyes_tools::abi::{
    ABI_VERSION, AbiBuffer, AbiImageView, AbiToolOutput, CallFn, CreateFn, DescribeFn, DestroyFn,
    FreeOutputFn, ToolPluginV1, guest,
};

static DESCRIPTOR: ToolPluginV1 = ToolPluginV1 {
    struct_size: std::mem::size_of::<ToolPluginV1>(),
    abi_version: ABI_VERSION,
    flags: 0,
    name: c"raw_tool".as_ptr(),
    plugin_version: c"0.0.1".as_ptr(),
    describe: Some(describe as DescribeFn),
    create: Some(create as CreateFn),
    destroy: Some(destroy as DestroyFn),
    call: Some(call as CallFn),
    // The crate's own copy of the ABI's `free_output`, compiled into this library: buffers are
    // freed by the allocator that made them.
    free_output: Some(guest::free_output as FreeOutputFn),
};

/// The ABI version.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_abi_version() -> u32 {
    ABI_VERSION
}

/// The descriptor.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_plugin_v1() -> *const ToolPluginV1 {
    &DESCRIPTOR
}

const SPEC: &str = r#"{"name": "raw_tool", "description": "Returns malformed outputs (test only).", "parameters": {"type": "object", "properties": {"mode": {"type": "string"}}}}"#;

unsafe extern "C" fn describe(out: *mut AbiToolOutput) -> i32 {
    let mut output = AbiToolOutput::EMPTY;
    output.text = AbiBuffer::from_vec(SPEC.as_bytes().to_vec());
    // SAFETY: the host passes a writable, zero-initialised output.
    unsafe { out.write(output) };
    0
}

unsafe extern "C" fn create(
    _config: *const u8,
    _config_len: usize,
    instance: *mut *mut c_void,
    _out: *mut AbiToolOutput,
) -> i32 {
    // The tool is stateless; any non-null token serves as its instance.
    // SAFETY: the host passes a writable pointer slot.
    unsafe { instance.write(std::ptr::NonNull::<c_void>::dangling().as_ptr()) };
    0
}

unsafe extern "C" fn destroy(_instance: *mut c_void) {}

unsafe extern "C" fn call(
    _instance: *mut c_void,
    args: *const u8,
    args_len: usize,
    _image: *const AbiImageView,
    out: *mut AbiToolOutput,
) -> i32 {
    let args: &[u8] = if args.is_null() {
        &[]
    } else {
        // SAFETY: non-null; the host lends `args_len` readable bytes at `args` for the call.
        unsafe { std::slice::from_raw_parts(args, args_len) }
    };
    let mut output = AbiToolOutput::EMPTY;
    if args.windows(9).any(|w| w == b"bad-image") {
        // Claims 4×4 RGB (48 bytes) but provides 10.
        output.image = AbiBuffer::from_vec(vec![7; 10]);
        output.image_width = 4;
        output.image_height = 4;
    } else {
        // "ok " followed by bytes that are not UTF-8.
        output.text = AbiBuffer::from_vec(vec![b'o', b'k', b' ', 0xff, 0xfe, 0x80]);
    }
    // SAFETY: the host passes a writable, zero-initialised output.
    unsafe { out.write(output) };
    0
}
