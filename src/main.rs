//! The `shrink` binary: parses the command line and runs one subcommand.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match shrink::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `submit` and `jobs` promise CI that 3 means a usage error (2 is a failed job).
            let ci_command = std::env::args()
                .nth(1)
                .is_some_and(|c| c == "submit" || c == "jobs");
            let usage = e.use_stderr();
            let _ = e.print();
            return if !usage {
                std::process::ExitCode::SUCCESS
            } else if ci_command {
                std::process::ExitCode::from(shrink::cli::submit::EXIT_USAGE)
            } else {
                std::process::ExitCode::from(2)
            };
        }
    };
    match shrink::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
