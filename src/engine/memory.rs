//! Resident-set sampling: how much memory loading and running a session costs.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Current resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn current_rss() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // The kernel reports pages of this size on every Linux target Shrink runs on.
    4096
}

/// Returns memory that earlier work freed to the OS, so that it does not hide the growth of the
/// next measurement (glibc keeps freed memory resident and reuses it).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Samples the resident set every millisecond on a helper thread and keeps the peak.
/// The figure is process-wide: concurrent jobs in the same process add to it (the report says so).
pub struct PeakSampler {
    start: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl PeakSampler {
    pub fn start() -> Self {
        release_free_memory();
        let start = current_rss();
        let peak = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.fetch_max(current_rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .ok();
        Self {
            start,
            peak,
            stop,
            handle,
        }
    }

    /// Growth over the starting level right now (also counted toward the peak: the sampling
    /// thread may not have run since, on a busy machine).
    pub fn growth_now(&self) -> u64 {
        let now = current_rss();
        self.peak.fetch_max(now, Ordering::Relaxed);
        now.saturating_sub(self.start)
    }

    /// Stops sampling and returns the peak growth over the starting level.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.fetch_max(current_rss(), Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed).saturating_sub(self.start)
    }
}
