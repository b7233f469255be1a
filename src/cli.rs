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
    /// Quantize a model locally (static int8 QDQ), with the same code as the `quantize` stage.
    Quantize(QuantizeArgs),
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The float ONNX model.
    pub model: PathBuf,
    /// Calibration samples (.npz or .safetensors).
    pub calibration: PathBuf,
    /// Where to write the quantized model.
    pub output: PathBuf,
    /// Calibration samples to use.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// One weight scale per tensor instead of per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// Symmetric int8 activations instead of asymmetric uint8.
    #[arg(long)]
    pub int8_activations: bool,
    /// Node names to keep in float.
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Calibrate with this percentile of the values (e.g. 99.99) instead of min/max.
    #[arg(long)]
    pub percentile: Option<f64>,
    #[arg(long, env = "SHRINK_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
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
        Command::Quantize(args) => quantize(args),
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

fn quantize(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    use crate::engine::quantize::{params::ActivationType, quantize_static, StaticOptions};
    let rt = Runtime::global(args.ort_library.as_deref())?;
    let model = engine::onnx::load_model_file(&args.model)
        .with_context(|| format!("while reading {}", args.model.display()))?;
    let data = engine::dataset::load(&args.calibration)
        .with_context(|| format!("while reading {}", args.calibration.display()))?;
    let opts = StaticOptions {
        per_channel: !args.per_tensor,
        activation: if args.int8_activations {
            ActivationType::Int8
        } else {
            ActivationType::Uint8
        },
        op_types: crate::domain::quantize::DEFAULT_OP_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        exclude: args.exclude,
        percentile: args.percentile,
    };
    let q = quantize_static(&rt, &model, &data, args.samples, &opts, &engine::NoProgress)?;
    std::fs::write(&args.output, &q.model.bytes)
        .with_context(|| format!("while writing {}", args.output.display()))?;
    for l in &q.layers {
        println!("{:<40} {:<8} {:<6} {}", l.node, l.op, l.precision, l.reason);
    }
    for n in &q.notes {
        println!("note: {n}");
    }
    println!(
        "wrote {} ({} bytes, from {} bytes)",
        args.output.display(),
        q.model.bytes.len(),
        model.bytes.len()
    );
    Ok(ExitCode::SUCCESS)
}
