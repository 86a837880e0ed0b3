//! A deliberately broken tool plugin: it exports the ABI version but no descriptor symbol.

// Exporting a C symbol needs `no_mangle`, which the workspace's `unsafe_code` lint flags.
#![allow(unsafe_code)]

/// Claims ABI 1.0.
#[unsafe(no_mangle)]
pub extern "C" fn deepeyes_tool_abi_version() -> u32 {
    1 << 16
}
