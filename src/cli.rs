//! Subcommands: `serve`, `worker`, `migrate`, `openapi`, `eval`.
use crate::config::Settings;
use crate::domain::spec::EvaluateOptions;
use crate::engine::{self, runtime::Runtime};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shrink",
    version,
    about = "Distill, prune, quantize and measure ONNX models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP API and in-process workers.
    Serve(Settings),
    /// Run workers only (no HTTP), sharing the database and object store with other processes.
    Worker(Settings),
    /// Apply database migrations and exit.
    Migrate(Settings),
    /// Print the OpenAPI document.
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Evaluate a model on a dataset locally, with the same code as the `evaluate` stage.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// The dataset (.npz or .safetensors).
    pub data: PathBuf,
    /// Print the metrics as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The classifier output (inferred when unambiguous).
    #[arg(long)]
    pub output: Option<String>,
    #[arg(long, default_value_t = EvaluateOptions::default().batch_size)]
    pub batch_size: u32,
    #[arg(long, default_value_t = EvaluateOptions::default().latency_runs)]
    pub latency_runs: u32,
    #[arg(long, default_value_t = EvaluateOptions::default().warmup_runs)]
    pub warmup_runs: u32,
    #[arg(long, default_value_t = EvaluateOptions::default().threads)]
    pub threads: u32,
    #[arg(long)]
    pub max_samples: Option<u64>,
    /// Path to libonnxruntime.so (else ORT_DYLIB_PATH, then `.venv`).
    #[arg(long, env = "SHRINK_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Eval(args) => eval(args),
        Command::Openapi { output } => {
            let doc = crate::http::openapi::document_json();
            match output {
                Some(path) => std::fs::write(&path, doc)
                    .with_context(|| format!("while writing {}", path.display()))?,
                None => println!("{doc}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(s) => async_main(s, crate::app::Role::Serve),
        Command::Worker(s) => async_main(s, crate::app::Role::Worker),
        Command::Migrate(s) => async_main(s, crate::app::Role::Migrate),
    }
}

fn async_main(settings: Settings, role: crate::app::Role) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(settings.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    rt.block_on(crate::app::run_role(settings, role))?;
    Ok(ExitCode::SUCCESS)
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let rt = Runtime::global(args.ort_library.as_deref())?;
    let model = engine::onnx::load_model_file(&args.model)
        .with_context(|| format!("while reading {}", args.model.display()))?;
    let data = engine::dataset::load(&args.data)
        .with_context(|| format!("while reading {}", args.data.display()))?;
    let opts = EvaluateOptions {
        output: args.output,
        batch_size: args.batch_size,
        latency_runs: args.latency_runs,
        warmup_runs: args.warmup_runs,
        threads: args.threads,
        max_samples: args.max_samples,
    };
    let eval = engine::evaluate::evaluate(&rt, &model, &data, &opts, None, &engine::NoProgress)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&eval.metrics)?);
    } else {
        print!("{}", engine::table::render_metrics(&eval.metrics));
        for n in &eval.notes {
            println!("note: {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
