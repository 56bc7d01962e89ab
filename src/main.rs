use std::process::ExitCode;

fn main() -> ExitCode {
    devpocket::cli::main()
}
