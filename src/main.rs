//! The `shrink` binary: parses the command line and runs one subcommand.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = shrink::cli::Cli::parse();
    match shrink::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
