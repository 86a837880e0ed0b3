//! A deliberately broken tool plugin: it claims ABI version 2.0, which a 1.x host must refuse
//! before touching anything else.

// Exporting a C symbol needs `no_mangle`, which the workspace's `unsafe_code` lint flags.
#![allow(unsafe_code)]

/// Claims ABI 2.0 (`major << 16 | minor`).
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_abi_version() -> u32 {
    2 << 16
}

/// Never reached: the host stops at the version check.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_plugin_v1() -> *const u8 {
    std::ptr::null()
}
