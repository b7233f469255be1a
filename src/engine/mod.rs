//! The ML engine: reads ONNX models and datasets, runs them in ONNX Runtime and measures them.
//!
//! It is a plain synchronous library: no async runtime, web, database or object-storage crate is
//! imported here (a test enforces it), so it can move to its own crate or run on the command line.
pub mod channels;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod latency;
pub mod memory;
pub mod metrics;
pub mod onnx;
pub mod parallel;
pub mod prune;
pub mod quantize;
pub mod runtime;
pub mod table;
pub mod task;
pub mod train;

pub use error::{EngineError, Result};

/// A model's summary as an upload records it: its graph ([`onnx::summarize`]) and, for each
/// output, the operators on its path that training cannot run.
pub fn inspect(model: &onnx::LoadedModel) -> crate::domain::model::ModelSummary {
    let mut summary = onnx::summarize(&model.proto);
    if let Some(graph) = model.proto.graph.as_ref() {
        summary.untrainable_ops = train::graph::untrainable_ops(graph);
    }
    summary
}

/// Called by long computations between units of work; returning an error stops the work.
/// Workers use it to report progress and to honour cancellation.
pub trait Progress: Sync {
    /// `fraction` is this computation's completion in 0..1.
    fn update(&self, fraction: f64) -> Result<()>;
}

/// A [`Progress`] that ignores updates and never cancels.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _fraction: f64) -> Result<()> {
        Ok(())
    }
}

/// Maps a sub-range of a parent's progress, so nested steps report in the parent's 0..1 scale.
pub struct SubProgress<'a> {
    pub parent: &'a dyn Progress,
    pub start: f64,
    pub span: f64,
}

impl Progress for SubProgress<'_> {
    fn update(&self, fraction: f64) -> Result<()> {
        self.parent
            .update(self.start + self.span * fraction.clamp(0.0, 1.0))
    }
}
