//! The `dolores` binary: all the work is in the library (`dolores::cli`). The binary
//! only picks the allocator, which is the program's choice, not the library's.

#![forbid(unsafe_code)]

/// jemalloc, because glibc's malloc kept the memory of a burst (146–204 MB of RSS for a
/// store of 6 MB after 4,500 messages of 64 KB) where jemalloc gives it back within
/// seconds: docs/benchmarks.md, "Memory after bursts".
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "jemalloc")]
    purge_in_background();
    dolores::cli::main()
}

/// Turns on jemalloc's background threads, which return freed pages to the system
/// after `dirty_decay_ms` (10 s) even while the server is idle; without them jemalloc
/// purges only as it allocates, so a burst followed by quiet would keep its memory.
#[cfg(feature = "jemalloc")]
fn purge_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("dolores: warning: memory freed after a burst may not return to the system: {e}");
    }
}
