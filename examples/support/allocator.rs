//! The binaries' allocator: mimalloc, told to keep the memory it is given back.
//!
//! A training step frees its activations and gradients (hundreds of MB at 224 px) and
//! allocates as much again the next step. mimalloc hands freed memory back to the OS after a
//! delay (1 s in the mimalloc v3 that `libmimalloc-sys` builds: `MIMALLOC_VERBOSE=1` lists
//! it), and the kernel then zeroes every page again when the next step touches it: a sixth of
//! a 224 px ResNet-18 training step on a 2-core AMD EPYC Zen 4 (`perf`: the kernel's
//! `clear_page_erms`). With that purge off, the memory stays mapped and is reused: 9.1-9.4
//! pairs/s against 7.3-8.7 with the default, alternating runs of `throughput train --size
//! 224` (inference did not change). The process keeps its peak memory.
//!
//! `MIMALLOC_PURGE_DELAY` in the environment still decides where it is set.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_e` (the same in mimalloc v2
/// and v3), which `libmimalloc-sys` leaves unnamed.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turns mimalloc's purging of freed memory off, unless `MIMALLOC_PURGE_DELAY` is set.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` writes one of mimalloc's option values, for any option index
    // below `_mi_option_last` (15 is `purge_delay`); -1 is a valid purge delay ("never").
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}
