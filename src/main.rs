fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    tokenmeter::cli::main()
}

/// glibc's malloc gives threads that allocate at the same time arenas of their own (up to eight
/// per core) and keeps what each freed, so the Kafka consumer's batches, passing through several
/// threads, held the service's RSS at the high water of every arena. With two arenas a
/// 10M-event drain peaked at 199 MiB where the default had reached 266 (BENCHMARKS.md, Kafka
/// ingest). An operator's `MALLOC_ARENA_MAX` wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: runs before any other thread exists, and only tunes the allocator.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
