//! The `dolores` binary: all the work is in the library (`dolores::cli`).

fn main() -> std::process::ExitCode {
    dolores::cli::main()
}
