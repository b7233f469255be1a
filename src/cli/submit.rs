//! `shrink submit`: one command for CI — upload a model and data, queue a job, wait with progress,
//! download the results, write a Markdown summary and JUnit XML, and exit with the outcome.
//!
//! Exit statuses: 0 the job succeeded and every verdict passed; 1 it succeeded but a verdict
//! failed; 2 it failed or was cancelled; 3 usage, authentication or connection error; 4 the wait
//! timed out (the job goes on).
use super::remote::{Api, RemoteArgs};
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub const EXIT_OK: u8 = 0;
pub const EXIT_VERDICT_FAILED: u8 = 1;
pub const EXIT_JOB_FAILED: u8 = 2;
pub const EXIT_USAGE: u8 = 3;
pub const EXIT_TIMEOUT: u8 = 4;

#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The ONNX model.
    pub model: PathBuf,
    /// The evaluation data (.npz or .safetensors).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Calibration samples (static quantization).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Training rows (training stages).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Unlabelled rows training stages learn from the teacher alone (KL).
    #[arg(long)]
    pub unlabelled: Option<PathBuf>,
    /// A job spec (JSON) without ids: the files above stand in for them.
    #[arg(long, conflicts_with = "pipeline")]
    pub spec: Option<PathBuf>,
    /// Stages with default options, e.g. `quantize,evaluate` (instead of --spec).
    #[arg(long, value_delimiter = ',')]
    pub pipeline: Vec<String>,
    /// The accuracy budget (0.01 = one point of top-1).
    #[arg(long)]
    pub max_accuracy_drop: Option<f64>,
    /// A label `key=value` (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Wait for the job to end and exit with its outcome.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits: `90s`, `30m`, `2h`.
    #[arg(long, default_value = "30m")]
    pub timeout: String,
    #[command(flatten)]
    pub outputs: Outputs,
}

/// What waiting for a job writes once it ends.
#[derive(clap::Args, Default)]
pub struct Outputs {
    /// Download the job's artifacts (models, report, log) into this directory.
    #[arg(long)]
    pub download: Option<PathBuf>,
    /// Write JUnit XML, one test case per verdict.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Write a Markdown summary (e.g. `$GITHUB_STEP_SUMMARY`).
    #[arg(long)]
    pub summary: Option<PathBuf>,
}

/// Parses `90s`, `30m`, `2h` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (number, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: f64 = number
        .parse()
        .map_err(|_| anyhow!("`{text}` is not a duration: use 90s, 30m or 2h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("`{text}` is not a duration: use 90s, 30m or 2h"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

pub fn run(args: SubmitArgs) -> ExitCode {
    block_on_exit(submit(args))
}

/// Runs a CI command: its exit status, or 3 (usage) with the error printed.
pub fn block_on_exit(work: impl std::future::Future<Output = anyhow::Result<u8>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match rt.block_on(work) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The spec to send: the file given, or the stages named, with the budget and labels.
fn build_spec(args: &SubmitArgs) -> anyhow::Result<Value> {
    let mut spec = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("while reading {}", path.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => {
            let stages = if args.pipeline.is_empty() {
                vec!["evaluate".to_string()]
            } else {
                args.pipeline.clone()
            };
            json!({"pipeline": stages.iter().map(|s| json!({"stage": s.trim()})).collect::<Vec<_>>()})
        }
    };
    let Some(obj) = spec.as_object_mut() else {
        bail!("the spec must be a JSON object");
    };
    if let Some(drop) = args.max_accuracy_drop {
        obj.entry("constraints")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .context("`constraints` in the spec must be an object")?
            .insert("max_accuracy_drop".into(), json!(drop));
    }
    if !args.labels.is_empty() {
        let labels = obj
            .entry("labels")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .context("`labels` in the spec must be an object")?;
        for label in &args.labels {
            let (k, v) = label
                .split_once('=')
                .with_context(|| format!("--label `{label}` must be key=value"))?;
            labels.insert(k.to_string(), json!(v));
        }
    }
    Ok(spec)
}

async fn submit(args: SubmitArgs) -> anyhow::Result<u8> {
    let timeout = parse_duration(&args.timeout)?;
    let spec = build_spec(&args)?;
    let mut files: Vec<(&str, &Path)> = vec![("model", &args.model), ("dataset", &args.dataset)];
    if let Some(c) = &args.calibration {
        files.push(("calibration", c));
    }
    if let Some(t) = &args.train {
        files.push(("train", t));
    }
    if let Some(u) = &args.unlabelled {
        files.push(("unlabelled", u));
    }
    let mut loaded = Vec::new();
    // The same files and spec make the same key: a retried submit (even a rerun CI step) gets the
    // job the first one created instead of a second job.
    let mut hash = Sha256::new();
    hash.update(spec.to_string().as_bytes());
    for (part, path) in &files {
        let bytes =
            std::fs::read(path).with_context(|| format!("while reading {}", path.display()))?;
        hash.update(part.as_bytes());
        hash.update(Sha256::digest(&bytes));
        let name = path
            .file_name()
            .map_or_else(|| part.to_string(), |n| n.to_string_lossy().into_owned());
        loaded.push((part.to_string(), name, bytes));
    }
    let idempotency_key = format!("shrink-submit-{}", &hex::encode(hash.finalize())[..32]);
    let api = Api::new(&args.remote)?;
    let url = format!("{}/jobs", api.base);
    let response = api
        .send("POST /jobs", |c| {
            let mut form = reqwest::multipart::Form::new().text("spec", spec.to_string());
            for (part, name, bytes) in &loaded {
                form = form.part(
                    part.clone(),
                    reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
                );
            }
            Ok(c.post(&url)
                .header("idempotency-key", &idempotency_key)
                .multipart(form))
        })
        .await?;
    let job: Value = response.json().await?;
    let id = job["id"]
        .as_str()
        .context("the server answered without a job id")?
        .to_string();
    println!("{id}");
    eprintln!(
        "job {id} queued in project {}",
        job["project"].as_str().unwrap_or("?")
    );
    if !args.wait {
        return Ok(EXIT_OK);
    }
    let Some(job) = wait(&api, &id, timeout).await? else {
        eprintln!(
            "job {id}: still running after {}; it goes on (shrink jobs wait {id})",
            args.timeout
        );
        return Ok(EXIT_TIMEOUT);
    };
    finish(&api, &args.outputs, &job).await
}

/// How waiting shows progress on stderr: a live bar on a terminal, a line per change otherwise
/// (CI logs), both with stage, percent, elapsed time and an estimate of what is left.
struct Display {
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
    last: (String, String, i64),
}

impl Display {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(100);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} {msg:<28} [{bar:30}] {pos:>3}% (about {eta} left)",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Display {
            started: Instant::now(),
            bar,
            last: (String::new(), String::new(), -1),
        }
    }

    fn show(&mut self, job: &Value) {
        let status = job["status"].as_str().unwrap_or("").to_string();
        let stage = job["stage"].as_str().unwrap_or("-").to_string();
        let percent = (job["progress"].as_f64().unwrap_or(0.0) * 100.0).round() as i64;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{status} {stage}"));
            bar.set_position(percent.clamp(0, 100) as u64);
            return;
        }
        let key = (status.clone(), stage.clone(), percent / 5);
        if key == self.last {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = (percent > 0 && percent < 100)
            .then(|| elapsed * (100 - percent) as f64 / percent as f64)
            .map_or(String::new(), |s| format!(", about {s:.0} s left"));
        eprintln!("[{elapsed:>6.1} s] {status} {stage} {percent}%{eta}");
        self.last = key;
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn is_final(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Waits for the job to end, following its event stream and polling when the stream is not
/// available or breaks; `None` when `timeout` passes first.
pub async fn wait(api: &Api, id: &str, timeout: Duration) -> anyhow::Result<Option<Value>> {
    let mut display = Display::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let followed = tokio::time::timeout_at(deadline, follow(api, id, &mut display)).await;
    let result = match followed {
        Err(_) => Ok(None),
        Ok(Ok(Some(job))) => Ok(Some(job)),
        // The stream ended early or broke: poll (which also retries connection errors).
        Ok(Ok(None)) | Ok(Err(_)) => poll(api, id, &mut display, deadline).await,
    };
    display.done();
    result
}

/// Follows `GET /jobs/{id}/events` until a final event; `None` when the stream ends before one.
async fn follow(api: &Api, id: &str, display: &mut Display) -> anyhow::Result<Option<Value>> {
    use futures::StreamExt;
    let url = format!("{}/jobs/{id}/events", api.base);
    let r = api
        .http
        .get(&url)
        .bearer_auth(&api.key)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("the event stream answered {}", r.status());
    }
    let mut stream = r.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data: String = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let job: Value = serde_json::from_str(&data)?;
            display.show(&job);
            if is_final(&job) {
                return Ok(Some(job));
            }
        }
    }
    Ok(None)
}

async fn poll(
    api: &Api,
    id: &str,
    display: &mut Display,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Option<Value>> {
    loop {
        let job = api.get_json(&format!("/jobs/{id}")).await?;
        display.show(&job);
        if is_final(&job) {
            return Ok(Some(job));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reports, downloads and writes what was asked for an ended job; its exit status.
pub async fn finish(api: &Api, args: &Outputs, job: &Value) -> anyhow::Result<u8> {
    let id = job["id"].as_str().unwrap_or("");
    let status = job["status"].as_str().unwrap_or("");
    if status != "succeeded" {
        let error = &job["error"];
        eprintln!(
            "job {id} {status}: {}",
            error["message"].as_str().unwrap_or("(no error recorded)")
        );
        for cause in error["causes"].as_array().into_iter().flatten() {
            eprintln!("  caused by: {}", cause.as_str().unwrap_or(""));
        }
        write_outputs(args, job, None)?;
        return Ok(EXIT_JOB_FAILED);
    }
    let report = api.get_json(&format!("/jobs/{id}/report")).await?;
    if let Some(dir) = &args.download {
        download(api, id, dir).await?;
    }
    write_outputs(args, job, Some(&report))?;
    let verdicts = report["verdicts"].as_array().cloned().unwrap_or_default();
    for v in &verdicts {
        eprintln!(
            "{} {}: {}",
            if v["passed"] == true { "PASS" } else { "FAIL" },
            v["constraint"].as_str().unwrap_or(""),
            v["detail"].as_str().unwrap_or("")
        );
    }
    if verdicts.iter().all(|v| v["passed"] == true) {
        Ok(EXIT_OK)
    } else {
        Ok(EXIT_VERDICT_FAILED)
    }
}

/// Downloads every artifact of job `id` into `dir`.
pub async fn download(api: &Api, id: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("while creating {}", dir.display()))?;
    let artifacts = api.get_json(&format!("/jobs/{id}/artifacts")).await?;
    for a in artifacts.as_array().into_iter().flatten() {
        let name = a["name"].as_str().context("an artifact without a name")?;
        // Names come from the server: never let one write outside the directory.
        if name.contains('/') || name.contains("..") {
            bail!("refusing the artifact name `{name}`");
        }
        let bytes = api
            .get_bytes(&format!("/jobs/{id}/artifacts/{name}"))
            .await?;
        std::fs::write(dir.join(name), &bytes)?;
        eprintln!(
            "downloaded {} ({} bytes)",
            dir.join(name).display(),
            bytes.len()
        );
    }
    Ok(())
}

fn write_outputs(args: &Outputs, job: &Value, report: Option<&Value>) -> anyhow::Result<()> {
    if let Some(path) = &args.summary {
        std::fs::write(path, super::ci_reports::summary_markdown(job, report))
            .with_context(|| format!("while writing {}", path.display()))?;
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, super::ci_reports::junit_xml(job, report))
            .with_context(|| format!("while writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
