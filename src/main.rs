//! The `dolores` binary: all the work is in the library (`dolores::cli`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    dolores::cli::main()
}
