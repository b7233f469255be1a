//! Bridges the blocking engine and the database: the engine writes progress into atomics and
//! reads stop flags; an async task renews the lease with that progress and sets the flags.
use crate::engine::{EngineError, Progress};
use crate::store::queue::Lease;
use crate::store::{now_ms, Db};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Why the engine was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    LeaseLost,
    Shutdown,
}

/// Shared between the engine thread and the heartbeat task.
#[derive(Default)]
pub struct JobProgress {
    /// Overall progress (f64 bits) in 0..1.
    overall: AtomicU64,
    stage: Mutex<String>,
    /// Where the current step sits in the overall range: (start, span).
    window: Mutex<(f64, f64)>,
    cancelled: AtomicBool,
    lease_lost: AtomicBool,
    shutdown: AtomicBool,
    /// What the pipeline logged so far: stored as `job.log` when the attempt fails.
    log: Mutex<String>,
    timing: Mutex<StageTiming>,
}

/// The stage running now and since when; finished stages with their seconds.
#[derive(Default)]
struct StageTiming {
    current: Option<(String, std::time::Instant)>,
    done: Vec<(String, f64)>,
}

impl crate::pipeline::JobProgress for JobProgress {
    fn enter(&self, stage: &str, start: f64, span: f64) {
        {
            let mut t = self.timing.lock().unwrap();
            if t.current.as_ref().is_none_or(|(name, _)| name != stage) {
                if let Some((name, since)) = t.current.take() {
                    t.done.push((name, since.elapsed().as_secs_f64()));
                }
                t.current = Some((stage.to_string(), std::time::Instant::now()));
            }
        }
        *self.stage.lock().unwrap() = stage.to_string();
        *self.window.lock().unwrap() = (start, span);
        self.overall.store(start.to_bits(), Ordering::Relaxed);
    }

    fn log(&self, line: &str) {
        let mut log = self.log.lock().unwrap();
        log.push_str(line);
        if !line.ends_with('\n') {
            log.push('\n');
        }
    }
}

impl JobProgress {
    /// The log lines written so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Every stage entered, with its wall time (the last one up to now).
    pub fn stage_times(&self) -> Vec<(String, f64)> {
        let t = self.timing.lock().unwrap();
        let mut out = t.done.clone();
        if let Some((name, since)) = &t.current {
            out.push((name.clone(), since.elapsed().as_secs_f64()));
        }
        out
    }

    pub fn snapshot(&self) -> (String, f64) {
        (
            self.stage.lock().unwrap().clone(),
            f64::from_bits(self.overall.load(Ordering::Relaxed)),
        )
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        if self.lease_lost.load(Ordering::Relaxed) {
            Some(StopReason::LeaseLost)
        } else if self.cancelled.load(Ordering::Relaxed) {
            Some(StopReason::Cancelled)
        } else if self.shutdown.load(Ordering::Relaxed) {
            Some(StopReason::Shutdown)
        } else {
            None
        }
    }
}

impl Progress for JobProgress {
    fn update(&self, fraction: f64) -> Result<(), EngineError> {
        let (start, span) = *self.window.lock().unwrap();
        self.overall.store(
            (start + span * fraction.clamp(0.0, 1.0)).to_bits(),
            Ordering::Relaxed,
        );
        match self.stop_reason() {
            Some(_) => Err(EngineError::Cancelled),
            None => Ok(()),
        }
    }
}

/// Whose lease to renew, for how long, and how often.
pub struct LeaseTerms {
    pub db: Db,
    pub job_id: String,
    pub worker: String,
    pub lease: Duration,
    pub interval: Duration,
    pub metrics: crate::metrics::SharedMetrics,
}

/// Renews the lease every `interval` until `done` fires, relaying progress and stop requests.
pub async fn run(
    terms: LeaseTerms,
    progress: Arc<JobProgress>,
    mut shutdown: watch::Receiver<bool>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    let LeaseTerms {
        db,
        job_id,
        worker,
        lease,
        interval,
        metrics,
    } = terms;
    loop {
        tokio::select! {
            _ = &mut done => return,
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            progress.shutdown.store(true, Ordering::Relaxed);
        }
        let (stage, fraction) = progress.snapshot();
        let now = now_ms();
        match db
            .heartbeat(
                &job_id,
                &worker,
                now,
                now + lease.as_millis() as i64,
                &stage,
                fraction,
            )
            .await
        {
            Ok(Lease::Held { cancel }) => {
                metrics.heartbeat("held");
                if cancel {
                    progress.cancelled.store(true, Ordering::Relaxed);
                }
            }
            Ok(Lease::Lost) => {
                metrics.heartbeat("lost");
                tracing::warn!("lost the lease; stopping this attempt");
                progress.lease_lost.store(true, Ordering::Relaxed);
                return;
            }
            // A database hiccup: keep working; the lease only expires if this persists.
            Err(e) => {
                metrics.heartbeat("error");
                tracing::warn!(error = %e, "heartbeat failed")
            }
        }
    }
}
