//! Subcommands: `serve`, `worker`, `migrate`, `admin`, `whoami`, `submit`, `jobs`, `openapi`, `eval`, `quantize`.
//!
//! Exit statuses: 0 success; 1 an error (printed with its causes); `shrink quantize` exits
//! [`EXIT_BUDGET_FAILED`] (3) when the model it wrote misses its `--max-accuracy-drop` budget.
pub mod admin;
pub mod ci_reports;
pub mod jobs;
pub mod remote;
pub mod submit;

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
    /// Manage projects, API keys and quotas directly in the database (no server needed).
    Admin(admin::AdminArgs),
    /// Show the project and role of the API key this CLI sends to the server.
    Whoami(remote::RemoteArgs),
    /// Upload a model and data, queue a job and (with --wait) exit with its outcome: 0 passed,
    /// 1 a verdict failed, 2 the job failed or was cancelled, 3 usage/auth/connection, 4 timeout.
    Submit(submit::SubmitArgs),
    /// Jobs from the command line: list, get, wait, cancel, report, download, logs.
    Jobs(jobs::JobsArgs),
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
    /// Samples (.npz or .safetensors): calibration for static mode, and the data the latency
    /// gate and the accuracy budget measure on unless `--eval` is given.
    pub calibration: PathBuf,
    /// Where to write the quantized model.
    pub output: PathBuf,
    /// auto | static | dynamic | weight-only | fp16.
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// Weight bits for weight-only mode (8 or 4).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// int4 block size (weight-only, 4 bits).
    #[arg(long, default_value_t = 32)]
    pub block_size: u32,
    /// Symmetric activation ranges (static) / int4 blocks without zero points.
    #[arg(long)]
    pub symmetric: bool,
    /// Calibration samples to use.
    #[arg(long, default_value_t = 128)]
    pub samples: u32,
    /// auto (the best scoring under the accuracy budget) | minmax | percentile | entropy | mse.
    #[arg(long, default_value = "auto")]
    pub calibrate: String,
    /// With `--calibrate percentile`: the share of values kept (e.g. 99.99).
    #[arg(long, default_value_t = 99.999)]
    pub percentile: f64,
    /// Weight scales: auto | per_channel | per_tensor.
    #[arg(long, default_value = "auto")]
    pub granularity: String,
    /// Symmetric int8 activations instead of asymmetric uint8.
    #[arg(long)]
    pub int8_activations: bool,
    /// Node names to keep in float.
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// The accuracy budget (0.005 = half a point of top-1).
    #[arg(long)]
    pub max_accuracy_drop: Option<f64>,
    /// Most trial models the accuracy budget's search builds (default 200).
    #[arg(long)]
    pub max_trials: Option<u32>,
    /// Quantize every layer even when that is slower (skips the speed search).
    #[arg(long)]
    pub all_layers: bool,
    /// static: leave biases as calibrated (no empirical bias correction).
    #[arg(long)]
    pub no_bias_correction: bool,
    /// static: how weights round to int8, gptq (the default) or nearest.
    #[arg(long)]
    pub weight_rounding: Option<String>,
    /// fp16: change the graph's inputs and outputs to float16 too.
    #[arg(long)]
    pub fp16_io: bool,
    /// Data for the latency gate and the accuracy budget (default: the calibration samples).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Training rows for `--mode qat`.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// `--mode qat`: training epochs (the stage's schedule when absent: 5 epochs, at least 100
    /// optimizer steps).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// `--mode qat`: peak AdamW learning rate (the stage's default when absent: 1e-4).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// `--mode qat`: rows per optimizer step (the stage's default when absent).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// `--mode qat`: memory one training pass may hold, in MiB (larger batches run as several
    /// passes whose gradients add up).
    #[arg(long, env = "SHRINK_TRAINING_PASS_MEMORY_MB", default_value_t = 4096)]
    pub training_pass_memory_mb: u64,
    /// The output the accuracy budget scores (inferred when unambiguous).
    #[arg(long = "output")]
    pub classifier: Option<String>,
    #[command(flatten)]
    pub task: TaskArgs,
    #[arg(long, env = "SHRINK_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
}

/// How the scored output is read (both `eval` and `quantize`).
#[derive(clap::Args, Clone)]
pub struct TaskArgs {
    /// classification | segmentation | sequence | ctc (inferred from the output's and labels' shapes).
    #[arg(long)]
    pub task: Option<String>,
    /// Segmentation with a single-channel probability map: the foreground threshold.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// CTC: the blank class index.
    #[arg(long)]
    pub blank: Option<u32>,
}

impl TaskArgs {
    /// Adds the options that were given to an `evaluate` stage's JSON.
    fn apply(&self, evaluate: &mut serde_json::Value) {
        if let Some(t) = &self.task {
            evaluate["task"] = t.clone().into();
        }
        if let Some(t) = self.threshold {
            evaluate["threshold"] = t.into();
        }
        if let Some(b) = self.blank {
            evaluate["blank"] = b.into();
        }
    }
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
    /// The scored output (inferred when unambiguous).
    #[arg(long)]
    pub output: Option<String>,
    #[command(flatten)]
    pub task: TaskArgs,
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
        Command::Admin(args) => admin::run(args),
        Command::Whoami(args) => remote::whoami(args),
        Command::Submit(args) => Ok(submit::run(args)),
        Command::Jobs(args) => Ok(jobs::run(args)),
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

/// A local command's options, validated as the API validates a job spec.
fn parse_spec(
    spec: serde_json::Value,
    train: bool,
) -> anyhow::Result<crate::domain::spec::JobSpec> {
    let provided: &[&str] = if train {
        &["model_id", "dataset_id", "train_dataset_id"]
    } else {
        &["model_id", "dataset_id"]
    };
    crate::domain::spec::JobSpec::parse(&spec, provided).map_err(|problems| {
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.pointer, p.detail))
            .collect();
        anyhow::anyhow!("invalid options: {}", text.join("; "))
    })
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let rt = Runtime::global(args.ort_library.as_deref())?;
    let model = engine::onnx::load_model_file(&args.model)
        .with_context(|| format!("while reading {}", args.model.display()))?;
    let data = engine::dataset::load(&args.data)
        .with_context(|| format!("while reading {}", args.data.display()))?;
    let mut stage = serde_json::json!({
        "stage": "evaluate", "batch_size": args.batch_size, "latency_runs": args.latency_runs,
        "warmup_runs": args.warmup_runs, "threads": args.threads,
    });
    if let Some(o) = &args.output {
        stage["output"] = o.clone().into();
    }
    if let Some(n) = args.max_samples {
        stage["max_samples"] = n.into();
    }
    args.task.apply(&mut stage);
    let opts = parse_spec(serde_json::json!({"pipeline": [stage]}), false)?.evaluate_options();
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
    use crate::domain::quantize::QuantizeOptions;
    let rt = Runtime::global(args.ort_library.as_deref())?;
    // From reading the model to writing the result, ONNX Runtime's load check included.
    let started = std::time::Instant::now();
    let model = engine::onnx::load_model_file(&args.model)
        .with_context(|| format!("while reading {}", args.model.display()))?;
    let options = serde_json::json!({
        "stage": "quantize",
        "mode": args.mode.replace('-', "_"),
        "granularity": args.granularity,
        "activation_type": if args.int8_activations { "int8" } else { "uint8" },
        "symmetric": args.symmetric,
        "exclude": args.exclude,
        "bits": args.bits,
        "block_size": args.block_size,
        "keep_io_types": !args.fp16_io,
        "allow_slower": args.all_layers,
        "calibration": {"method": args.calibrate, "samples": args.samples, "percentile": args.percentile},
    });
    let mut options = options.as_object().cloned().unwrap_or_default();
    if let Some(d) = args.max_accuracy_drop {
        options.insert("max_accuracy_drop".into(), d.into());
    }
    if let Some(n) = args.max_trials {
        options.insert("max_trials".into(), n.into());
    }
    if args.no_bias_correction {
        options.insert("bias_correction".into(), false.into());
    }
    if let Some(r) = &args.weight_rounding {
        options.insert("weight_rounding".into(), r.clone().into());
    }
    if options["mode"] == "qat" {
        let mut training = serde_json::json!({});
        if let Some(e) = args.epochs {
            training["epochs"] = e.into();
        }
        if let Some(r) = args.learning_rate {
            training["learning_rate"] = r.into();
        }
        if let Some(b) = args.batch_size {
            training["batch_size"] = b.into();
        }
        options.insert("qat".into(), training);
    }
    let mut evaluate = serde_json::json!({"stage": "evaluate"});
    if let Some(o) = &args.classifier {
        evaluate["output"] = o.clone().into();
    }
    args.task.apply(&mut evaluate);
    let spec = parse_spec(
        serde_json::json!({"pipeline": [options, evaluate]}),
        args.train.is_some(),
    )?;
    let crate::domain::spec::Stage::Quantize(q) = &spec.pipeline[0] else {
        unreachable!("the pipeline holds the quantize stage built above")
    };
    let q: &QuantizeOptions = q;
    let eval_opts = spec.evaluate_options();
    // Data is read only when calibration, the accuracy budget or the latency gate will use it.
    let load = |p: &std::path::Path| {
        engine::dataset::load(p).with_context(|| format!("while reading {}", p.display()))
    };
    let needed = crate::pipeline::quantize::reads_data(q, &model, &spec);
    let data = if needed {
        load(&args.calibration)?
    } else {
        engine::dataset::Dataset::empty()
    };
    let eval = match &args.eval {
        Some(p) if needed => Some(load(p)?),
        _ => None,
    };
    let train = args.train.as_deref().map(load).transpose()?;
    let eval_data = eval.as_ref().unwrap_or(&data);
    let ctx = crate::pipeline::StageContext {
        rt: &rt,
        spec: &spec,
        current: &model,
        eval_data,
        eval_opts: &eval_opts,
        calibration: Some(&data),
        train: train.as_ref(),
        unlabelled: None,
        student: None,
        teacher: None,
        training_pass_memory: (args.training_pass_memory_mb.max(1) as usize) << 20,
        progress: &engine::NoProgress,
    };
    let out = crate::pipeline::quantize::run(q, &ctx)?;
    for l in &out.layers {
        let s = l.sensitivity.map_or(String::new(), |s| format!("{s:+.4} "));
        println!(
            "{:<40} {:<8} {:<8} {s}{}",
            l.node, l.op, l.precision, l.reason
        );
    }
    // Without a quantized model (the gate kept the input) the input is written as the output.
    let written = out.model.as_ref().map_or(&model.bytes, |m| &m.bytes);
    std::fs::write(&args.output, written)
        .with_context(|| format!("while writing {}", args.output.display()))?;
    for n in &out.notes {
        println!("note: {n}");
    }
    println!(
        "wrote {} ({} bytes, from {} bytes) in {:.3} s",
        args.output.display(),
        written.len(),
        model.bytes.len(),
        started.elapsed().as_secs_f64()
    );
    // The budget's verdict, measured as the service measures it: the written model against the
    // input on the evaluation rows.
    // `--max-accuracy-drop 1` turns the budget off: no verdict.
    let limit = out.budget.filter(|l| *l < 1.0);
    if let (Some(limit), Some(quantized)) = (limit, &out.model) {
        let quick = EvaluateOptions {
            latency_runs: 1,
            warmup_runs: 0,
            ..eval_opts.clone()
        };
        let progress = &engine::NoProgress;
        let base = engine::evaluate::evaluate(&rt, &model, eval_data, &quick, None, progress)?;
        let after = engine::evaluate::evaluate(
            &rt,
            quantized,
            eval_data,
            &quick,
            Some(&base.as_baseline()),
            progress,
        )?;
        let verdict =
            crate::domain::report::stage_budget_verdict(0, limit, &base.metrics, &after.metrics);
        println!(
            "budget: {} ({})",
            if verdict.passed { "passed" } else { "FAILED" },
            verdict.detail
        );
        if !verdict.passed {
            return Ok(ExitCode::from(EXIT_BUDGET_FAILED));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `shrink quantize`'s exit status when the written model misses `--max-accuracy-drop`
/// (1 is any error: unreadable input, invalid options).
pub const EXIT_BUDGET_FAILED: u8 = 3;
