//! The allocator of the `deepeyes` binary, set up as its `main` does, so that benches time the
//! engines as they run there: mimalloc, never returning freed memory to the system.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Call first in `main`: mimalloc keeps the memory it frees.
#[allow(unsafe_code)]
pub(crate) fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h; -1: never purge.
    // SAFETY: a plain store into mimalloc's option table, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
}
