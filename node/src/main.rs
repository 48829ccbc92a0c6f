//! `flare-node`: one binary for every member of a federated-learning consortium.

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    flare_node::main_with_args(std::env::args_os())
}

/// One glibc malloc arena for the process. glibc gives threads that allocate at the same
/// moment arenas of their own (up to 8 per core) and keeps what is freed in each: the
/// chunk-sized buffers (1 MiB) of transfers, folds and reads, made and freed on the runtime's
/// and the blocking pool's many threads, left a controller pulling results while it served
/// the model 30 MiB more resident than one arena, at the same speed (docs/benchmarks.md,
/// "Results folded while they are made"). `MALLOC_ARENA_MAX`, when set, still decides.
#[allow(unsafe_code)]
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only tunes the allocator; no other thread exists yet, and
        // `M_ARENA_MAX` with a positive value is a documented, valid setting.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
