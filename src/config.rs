//! All settings in one struct: command-line flags with `SHRINK_*` environment fallbacks.
use clap::{Args, ValueEnum};
use std::fmt;
use std::path::PathBuf;

/// How logs are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Args)]
pub struct Settings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "SHRINK_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// Directory for the embedded defaults (SQLite database, local blobs, temporary uploads).
    #[arg(long, env = "SHRINK_DATA_DIR", default_value = "shrink-data")]
    pub data_dir: PathBuf,

    /// Database URL: `postgres://…` in production; defaults to SQLite at `<data-dir>/shrink.db`.
    #[arg(long, env = "SHRINK_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Store artifacts in this S3 bucket instead of `<data-dir>/blobs`.
    #[arg(long, env = "SHRINK_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Custom S3 endpoint (SeaweedFS, MinIO, Ceph...). Credentials come from the usual AWS chain.
    #[arg(long, env = "SHRINK_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Prefix for every object key (e.g. `shrink/`), so that a bucket can be shared.
    #[arg(long, env = "SHRINK_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,

    #[arg(long, env = "SHRINK_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted S3 servers.
    #[arg(long, env = "SHRINK_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,

    /// Answer artifact downloads with a redirect to a presigned S3 URL instead of streaming through the API.
    #[arg(long, env = "SHRINK_S3_PRESIGN", default_value_t = false, action = clap::ArgAction::Set)]
    pub s3_presign: bool,

    /// Create the bucket at start-up when it does not exist.
    #[arg(long, env = "SHRINK_S3_CREATE_BUCKET", default_value_t = false, action = clap::ArgAction::Set)]
    pub s3_create_bucket: bool,

    /// Largest accepted upload in bytes; larger bodies get 413 and leave nothing behind.
    #[arg(long, env = "SHRINK_MAX_UPLOAD_BYTES", default_value_t = 4 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// Jobs run at the same time in this process (`serve` and `worker`); 0 disables workers in `serve`.
    #[arg(long, env = "SHRINK_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Seconds a claimed job stays leased without a heartbeat before another worker may take it.
    #[arg(long, env = "SHRINK_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,

    /// Attempts per job for infrastructure failures (bad input never retries).
    #[arg(long, env = "SHRINK_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// How often idle workers look for jobs when no notification arrives, in milliseconds.
    #[arg(long, env = "SHRINK_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,

    /// Origins allowed to call the API from a browser (comma-separated; `*` for any).
    #[arg(long, env = "SHRINK_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// `shrink worker` only: serve `/metrics` and `/healthz` on this address (e.g. `0.0.0.0:9090`).
    #[arg(long, env = "SHRINK_METRICS_BIND")]
    pub metrics_bind: Option<String>,

    /// Let webhooks call loopback, private and link-local addresses (off: a tenant could reach the internal network).
    #[arg(long, env = "SHRINK_WEBHOOK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private: bool,

    /// How often `serve` looks for webhook deliveries to make, in milliseconds.
    #[arg(long, env = "SHRINK_WEBHOOK_POLL_MS", default_value_t = 1000)]
    pub webhook_poll_ms: u64,

    /// Attempts per webhook delivery before it is given up (backoff 5 s, 10 s, 20 s … up to an hour).
    #[arg(long, env = "SHRINK_WEBHOOK_MAX_ATTEMPTS", default_value_t = 12)]
    pub webhook_max_attempts: u32,

    /// Requests per second each API key may make (token bucket; 0 turns the limit off).
    #[arg(long, env = "SHRINK_RATE_LIMIT_PER_SECOND", default_value_t = 50)]
    pub rate_limit_per_second: u32,

    /// How many requests a key may make at once before the per-second rate applies.
    #[arg(long, env = "SHRINK_RATE_LIMIT_BURST", default_value_t = 200)]
    pub rate_limit_burst: u32,

    #[arg(long, env = "SHRINK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Path to libonnxruntime.so (also read from ORT_DYLIB_PATH); found in `.venv` or `<data-dir>` otherwise.
    #[arg(long, env = "SHRINK_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,

    /// When no ONNX Runtime library is found, install the pinned `onnxruntime` wheel into `<data-dir>` with pip.
    #[arg(long, env = "SHRINK_ORT_AUTO_INSTALL", default_value_t = true, action = clap::ArgAction::Set)]
    pub ort_auto_install: bool,

    /// Name of this worker in leases and logs; defaults to `<hostname>-<pid>`.
    #[arg(long, env = "SHRINK_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Memory one training pass (forward and backward over a batch) may hold, in MiB: a larger
    /// batch runs as several passes whose gradients add up, so the batch stays what the job asked.
    #[arg(long, env = "SHRINK_TRAINING_PASS_MEMORY_MB", default_value_t = 4096)]
    pub training_pass_memory_mb: u64,
}

impl Settings {
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("shrink.db").display()
            )
        })
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "host".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// Settings for tests and embedding: defaults with the data directory given.
    pub fn for_data_dir(data_dir: PathBuf) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            s: Settings,
        }
        let mut s = Wrapper::parse_from(["shrink"]).s;
        s.data_dir = data_dir;
        s
    }
}

/// Hides the password in a database URL.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field("database_url", &redact_url(&self.database_url()))
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_prefix", &self.s3_prefix)
            .field("s3_region", &self.s3_region)
            .field("s3_path_style", &self.s3_path_style)
            .field("s3_presign", &self.s3_presign)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("training_pass_memory_mb", &self.training_pass_memory_mb)
            .field("workers", &self.workers)
            .field("lease_secs", &self.lease_secs)
            .field("max_attempts", &self.max_attempts)
            .field("cors_origins", &self.cors_origins)
            .field("rate_limit_per_second", &self.rate_limit_per_second)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("log_format", &self.log_format)
            .field("ort_library", &self.ort_library)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_passwords_never_reach_debug_output() {
        let mut s = Settings::for_data_dir("d".into());
        s.database_url = Some("postgres://shrink:hunter2@db:5432/shrink".into());
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("shrink:***@db"));
    }

    #[test]
    fn the_embedded_default_is_sqlite_in_the_data_dir() {
        let s = Settings::for_data_dir("/tmp/x".into());
        assert_eq!(s.database_url(), "sqlite:///tmp/x/shrink.db?mode=rwc");
    }
}
