//! `shrink jobs list|get|wait|cancel|report|download|logs`: a job from the command line, with
//! the same key resolution and exit statuses as `shrink submit`.
use super::remote::Api;
use super::remote::RemoteArgs;
use super::submit::{self, parse_duration, Outputs, EXIT_OK, EXIT_TIMEOUT};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// The project's jobs, newest first: id, status, stage, progress.
    List {
        /// Only jobs with this status.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job, as JSON.
    Get { id: String },
    /// Wait for a job to end; exit as `shrink submit --wait` does.
    Wait {
        id: String,
        #[arg(long, default_value = "30m")]
        timeout: String,
        #[command(flatten)]
        outputs: Outputs,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// A succeeded job's report, as JSON.
    Report { id: String },
    /// Download every artifact of a job into a directory.
    Download { id: String, dir: PathBuf },
    /// A job's log.
    Logs { id: String },
}

pub fn run(args: JobsArgs) -> ExitCode {
    submit::block_on_exit(jobs(args))
}

async fn jobs(args: JobsArgs) -> anyhow::Result<u8> {
    let api = Api::new(&args.remote)?;
    let print = |v: &serde_json::Value| -> anyhow::Result<u8> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(EXIT_OK)
    };
    match args.command {
        JobsCommand::List { status, limit } => {
            let mut path = format!("/jobs?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            let page = api.get_json(&path).await?;
            for j in page["items"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<9}  {:<10}  {:>3.0}%  {}",
                    j["id"].as_str().unwrap_or(""),
                    j["status"].as_str().unwrap_or(""),
                    j["stage"].as_str().unwrap_or("-"),
                    j["progress"].as_f64().unwrap_or(0.0) * 100.0,
                    j["created_at"].as_str().unwrap_or("")
                );
            }
            Ok(EXIT_OK)
        }
        JobsCommand::Get { id } => print(&api.get_json(&format!("/jobs/{id}")).await?),
        JobsCommand::Wait {
            id,
            timeout,
            outputs,
        } => match submit::wait(&api, &id, parse_duration(&timeout)?).await? {
            Some(job) => submit::finish(&api, &outputs, &job).await,
            None => {
                eprintln!("job {id}: still running after {timeout}");
                Ok(EXIT_TIMEOUT)
            }
        },
        JobsCommand::Cancel { id } => {
            let job = api.post_empty(&format!("/jobs/{id}/cancel")).await?;
            eprintln!(
                "job {id}: {}{}",
                job["status"].as_str().unwrap_or(""),
                if job["cancel_requested"] == true && job["status"] == "running" {
                    " (stops at its next checkpoint)"
                } else {
                    ""
                }
            );
            Ok(EXIT_OK)
        }
        JobsCommand::Report { id } => print(&api.get_json(&format!("/jobs/{id}/report")).await?),
        JobsCommand::Download { id, dir } => {
            submit::download(&api, &id, &dir).await?;
            Ok(EXIT_OK)
        }
        JobsCommand::Logs { id } => {
            let bytes = api.get_bytes(&format!("/jobs/{id}/log")).await?;
            print!("{}", String::from_utf8_lossy(&bytes));
            Ok(EXIT_OK)
        }
    }
}
