//! Prometheus metrics (`prometheus-client`): one registry per running application, so that
//! several applications in one process (the tests) never mix their numbers.
//!
//! Counters and histograms are recorded where things happen (HTTP middleware, uploads, workers);
//! the gauges that describe shared state (jobs by status, queue depth, stored bytes) are read
//! from the database at scrape time, so every API replica reports the same, correct values.
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

fn http_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn job_buckets() -> Histogram {
    // 0.1 s to about 4.5 hours.
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// What the database says at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Jobs per status (every status, zero included).
    pub jobs_by_status: Vec<(String, i64)>,
    /// Running jobs per current stage.
    pub running_by_stage: Vec<(String, i64)>,
    /// Queued jobs that could run now or later.
    pub queue_depth: i64,
    /// Seconds the oldest queued job has waited (0 when none).
    pub oldest_queued_age_seconds: f64,
    /// Bytes stored per project (models, datasets, artifacts).
    pub stored_bytes_by_project: Vec<(String, i64)>,
}

/// Every metric Shrink exports.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    jobs: Family<Labels, Gauge>,
    running_jobs: Family<Labels, Gauge>,
    queue_depth: Gauge,
    oldest_queued: Gauge<f64, AtomicU64>,
    stored_bytes: Family<Labels, Gauge>,
    jobs_created: Counter,
    jobs_finished: Family<Labels, Counter>,
    job_duration: Family<Labels, Histogram, fn() -> Histogram>,
    stage_duration: Family<Labels, Histogram, fn() -> Histogram>,
    heartbeats: Family<Labels, Counter>,
    uploaded_bytes: Family<Labels, Counter>,
    rate_limited: Counter,
    webhook_deliveries: Family<Labels, Counter>,
    /// Scrapes set the database gauges and encode under one lock, so two never interleave.
    render_lock: std::sync::Mutex<()>,
    database_gauges: bool,
}

impl Metrics {
    /// `database_gauges`: export the gauges read from the database at scrape time (API processes;
    /// a worker process leaves them to the API, so that each value has one source).
    pub fn new(database_gauges: bool) -> Self {
        let mut registry = Registry::with_prefix("shrink");
        let m = Metrics {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_buckets as fn() -> Histogram),
            jobs: Family::default(),
            running_jobs: Family::default(),
            queue_depth: Gauge::default(),
            oldest_queued: Gauge::default(),
            stored_bytes: Family::default(),
            jobs_created: Counter::default(),
            jobs_finished: Family::default(),
            job_duration: Family::new_with_constructor(job_buckets as fn() -> Histogram),
            stage_duration: Family::new_with_constructor(job_buckets as fn() -> Histogram),
            heartbeats: Family::default(),
            uploaded_bytes: Family::default(),
            rate_limited: Counter::default(),
            webhook_deliveries: Family::default(),
            registry: Registry::default(),
            render_lock: std::sync::Mutex::new(()),
            database_gauges,
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            m.http_duration.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts this process made, by outcome (delivered, retrying, failed)",
            m.webhook_deliveries.clone(),
        );
        if database_gauges {
            registry.register("jobs", "Jobs by status (from the database)", m.jobs.clone());
            registry.register(
                "jobs_running",
                "Running jobs by current stage (from the database)",
                m.running_jobs.clone(),
            );
            registry.register(
                "queue_depth",
                "Queued jobs (from the database)",
                m.queue_depth.clone(),
            );
            registry.register(
                "queue_oldest_age_seconds",
                "How long the oldest queued job has waited (from the database)",
                m.oldest_queued.clone(),
            );
            registry.register(
                "stored_bytes",
                "Bytes of models, datasets and artifacts stored per project (from the database)",
                m.stored_bytes.clone(),
            );
        }
        registry.register(
            "jobs_created",
            "Jobs this process queued",
            m.jobs_created.clone(),
        );
        registry.register(
            "jobs_finished",
            "Attempts this process's workers ended, by outcome",
            m.jobs_finished.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Wall time of job attempts this process ran, by outcome",
            m.job_duration.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Wall time of pipeline stages this process ran, by stage",
            m.stage_duration.clone(),
        );
        registry.register(
            "worker_heartbeats",
            "Lease renewals this process's workers sent, by result",
            m.heartbeats.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Bytes received in uploads this process stored, by kind",
            m.uploaded_bytes.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Requests refused with 429 by the per-key rate limit",
            m.rate_limited.clone(),
        );
        Metrics {
            registry,
            database_gauges,
            ..m
        }
    }

    /// Whether `/metrics` should read the database first.
    pub fn reads_database(&self) -> bool {
        self.database_gauges
    }

    pub fn http_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels: Labels = vec![
            ("method", method.to_string()),
            ("route", route.to_string()),
            ("status", status.to_string()),
        ];
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration.get_or_create(&labels).observe(seconds);
    }

    pub fn job_created(&self) {
        self.jobs_created.inc();
    }

    pub fn job_finished(&self, outcome: &str, seconds: f64) {
        let labels: Labels = vec![("outcome", outcome.to_string())];
        self.jobs_finished.get_or_create(&labels).inc();
        self.job_duration.get_or_create(&labels).observe(seconds);
    }

    pub fn stage_finished(&self, stage: &str, seconds: f64) {
        self.stage_duration
            .get_or_create(&vec![("stage", stage.to_string())])
            .observe(seconds);
    }

    pub fn heartbeat(&self, result: &str) {
        self.heartbeats
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    pub fn uploaded(&self, kind: &str, bytes: u64) {
        self.uploaded_bytes
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc_by(bytes);
    }

    pub fn webhook_delivery(&self, outcome: &str) {
        self.webhook_deliveries
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// The text exposition format, with the database's view set first.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let _guard = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.jobs.clear();
        for (status, n) in &snapshot.jobs_by_status {
            self.jobs
                .get_or_create(&vec![("status", status.clone())])
                .set(*n);
        }
        self.running_jobs.clear();
        for (stage, n) in &snapshot.running_by_stage {
            self.running_jobs
                .get_or_create(&vec![("stage", stage.clone())])
                .set(*n);
        }
        self.queue_depth.set(snapshot.queue_depth);
        self.oldest_queued.set(snapshot.oldest_queued_age_seconds);
        self.stored_bytes.clear();
        for (project, n) in &snapshot.stored_bytes_by_project {
            self.stored_bytes
                .get_or_create(&vec![("project", project.clone())])
                .set(*n);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;
