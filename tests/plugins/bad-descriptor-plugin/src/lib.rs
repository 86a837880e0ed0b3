//! A deliberately broken tool plugin: its descriptor declares a `struct_size` far smaller than
//! ABI 1.0's descriptor, as a library built against a mangled header would.

// Exporting a C symbol needs `no_mangle`, which the workspace's `unsafe_code` lint flags.
#![allow(unsafe_code)]

/// A truncated descriptor: only the size and version fields.
#[repr(C)]
#[derive(Debug)]
pub struct Truncated {
    /// Declared size: just these two fields.
    pub struct_size: usize,
    /// ABI 1.0.
    pub abi_version: u32,
}

static DESCRIPTOR: Truncated = Truncated {
    struct_size: std::mem::size_of::<Truncated>(),
    abi_version: 1 << 16,
};

/// Claims ABI 1.0.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_abi_version() -> u32 {
    1 << 16
}

/// Points to the truncated descriptor.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_plugin_v1() -> *const Truncated {
    &DESCRIPTOR
}
