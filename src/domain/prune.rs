//! Options of the `prune` stage.
use super::training::Recovery;
use super::validation::{Checker, Validate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Unstructured: the smallest weights by magnitude become zero. Smaller when compressed, not
    /// faster in ONNX Runtime (its kernels are dense).
    #[default]
    Magnitude,
    /// Semi-structured N:M (2:4 by default) along each layer's input axis. Runs fast on sparse
    /// tensor cores (TensorRT); ONNX Runtime on CPU runs it dense.
    #[serde(rename = "n_m")]
    NM,
    /// Whole Conv channels, Gemm/MatMul neurons and attention heads removed: a smaller graph
    /// that ONNX Runtime runs faster.
    Structured,
}

/// Where the threshold is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// Every layer loses the same share.
    #[default]
    PerLayer,
    /// One threshold over all selected layers.
    Global,
}

/// How a channel's (or head's) importance is scored from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneImportance {
    /// L1 norm of the channel's weights (times its BatchNormalization scale).
    #[default]
    L1,
    /// L2 norm of the channel's weights (times its BatchNormalization scale).
    L2,
    /// First-order Taylor (Molchanov et al. 2019): how much the loss on the training rows
    /// (`train_dataset_id`, and `unlabelled_dataset_id` scored against the model's own class)
    /// changes when the channel goes, from activation × gradient. Attention heads keep L1.
    Taylor,
}

/// What structured pruning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneTarget {
    /// Conv output channels (filters), with the next layer's input channels, BatchNorm
    /// parameters and depthwise convolutions between them.
    Channels,
    /// Gemm/MatMul output neurons, with the next layer's inputs.
    Neurons,
    /// Attention heads: query/key/value columns, output-projection rows and head counts.
    Heads,
}

/// Recovery training inside the stage: the pruned model learns from the model as it entered
/// the stage — α·CE(labels) + (1−α)·T²·KL, KL alone without labels (α 0.5, T 2 by default) —
/// with zeros held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneFinetune {
    /// `magnitude`: prune in this many steps on the cubic schedule (Zhu & Gupta), training 1/`steps`
    /// of the training budget after each; 1 prunes at once then trains.
    #[serde(default = "default_steps")]
    pub steps: u32,
    #[serde(flatten)]
    pub recovery: Recovery,
}

fn default_steps() -> u32 {
    1
}
fn default_sparsity() -> f64 {
    0.5
}
fn default_n() -> u32 {
    2
}
fn default_m() -> u32 {
    4
}
fn default_multiple_of() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_targets() -> Vec<PruneTarget> {
    vec![
        PruneTarget::Channels,
        PruneTarget::Neurons,
        PruneTarget::Heads,
    ]
}

/// Options of the `prune` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneOptions {
    #[serde(default)]
    pub method: PruneMethod,
    /// `magnitude`: share of the selected weights zeroed; `structured`: share of every group's
    /// channels, neurons or heads removed.
    #[serde(default = "default_sparsity")]
    pub sparsity: f64,
    /// `magnitude`: per layer or one global threshold.
    #[serde(default)]
    pub scope: PruneScope,
    /// `n_m`: at most `n` non-zeros in every `m` consecutive weights.
    #[serde(default = "default_n")]
    pub n: u32,
    #[serde(default = "default_m")]
    pub m: u32,
    /// `structured`: what to remove.
    #[serde(default = "default_targets")]
    pub targets: Vec<PruneTarget>,
    /// `structured`: how channels and heads are ranked (norm of their weights).
    #[serde(default)]
    pub importance: PruneImportance,
    /// `structured`: kept channel counts rounded up to a multiple of this.
    #[serde(default = "default_multiple_of")]
    pub multiple_of: u32,
    /// Node (or weight) names left whole.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `magnitude`, `n_m`: leave the first layer dense.
    #[serde(default = "default_true")]
    pub skip_first: bool,
    /// `magnitude`, `n_m`: leave the last layer (the classifier) dense.
    #[serde(default = "default_true")]
    pub skip_last: bool,
    /// Recovery training on `train_dataset_id` (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<PruneFinetune>,
}

/// Options that only one method reads, so that a spec naming them for another is refused.
const ONLY_FOR: &[(&str, &str)] = &[
    ("scope", "magnitude"),
    ("n", "n_m"),
    ("m", "n_m"),
    ("targets", "structured"),
    ("importance", "structured"),
    ("multiple_of", "structured"),
    ("skip_first", "magnitude or n_m"),
    ("skip_last", "magnitude or n_m"),
];

impl PruneMethod {
    /// The name a spec uses.
    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::NM => "n_m",
            PruneMethod::Structured => "structured",
        }
    }
}

impl Validate for PruneOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        let method = self.method.name();
        for (key, owner) in ONLY_FOR {
            if c.given(key) && !owner.split(" or ").any(|o| o == method) {
                c.add(
                    key,
                    format!("`{key}` applies to method {owner}, not {method}"),
                );
            }
        }
        if self.method == PruneMethod::NM && c.given("sparsity") {
            c.add(
                "sparsity",
                "`n_m` sparsity is 1 − n/m; set `n` and `m` instead",
            );
        } else {
            c.check(
                "sparsity",
                self.sparsity > 0.0 && self.sparsity < 1.0,
                "`sparsity` must be a fraction between 0 and 1 (exclusive)",
            );
        }
        let n_ok = (1..=31).contains(&self.n);
        let m_ok = (2..=32).contains(&self.m);
        c.check("n", n_ok, "`n` must be an integer in 1..=31");
        c.check("m", m_ok, "`m` must be an integer in 2..=32");
        if self.method == PruneMethod::NM && n_ok && m_ok && self.n >= self.m {
            c.add("n", "`n` must be smaller than `m`");
        }
        c.check(
            "multiple_of",
            (1..=256).contains(&self.multiple_of),
            "`multiple_of` must be an integer in 1..=256",
        );
        c.check(
            "targets",
            !self.targets.is_empty(),
            "`targets` must be a non-empty list of: channels, neurons, heads",
        );
        if let Some(f) = &self.finetune {
            c.nested("finetune", f);
            if f.steps != 1 && self.method != PruneMethod::Magnitude {
                let at = format!("{}/steps", c.pointer("finetune"));
                c.add_at(at, "gradual `steps` apply to method magnitude");
            }
        }
    }
}

impl Validate for PruneFinetune {
    fn validate(&self, c: &mut Checker<'_>) {
        c.check(
            "steps",
            (1..=100).contains(&self.steps),
            "`steps` must be an integer in 1..=100",
        );
        c.flattened(&self.recovery);
    }
}

impl super::stage::StageOptions for PruneOptions {
    fn training(&self) -> Option<&Recovery> {
        self.finetune.as_ref().map(|f| &f.recovery)
    }

    fn check_inputs(
        &self,
        given: super::stage::Given,
        at: &str,
        p: &mut super::validation::Problems,
    ) {
        if self.importance == PruneImportance::Taylor && !given.train_data {
            p.add(
                format!("{at}/importance"),
                "`importance: taylor` scores channels by their gradients on the training rows: it needs `train_dataset_id`",
            );
        }
    }
}

/// The loss weight and temperature of recovery training when the spec leaves them unset.
pub const DEFAULT_ALPHA: f64 = 0.5;
pub const DEFAULT_TEMPERATURE: f64 = 2.0;

#[cfg(test)]
mod tests {
    use crate::domain::spec::JobSpec;
    use serde_json::json;

    const M: &str = "0193a4f0-8c1e-7b3a-9d2e-5f6a7b8c9d0e";

    fn problems(stage: serde_json::Value) -> Vec<String> {
        let mut got: Vec<String> = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "pipeline": [stage]}),
            &[],
        )
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.pointer)
        .collect();
        // Every problem is reported; their order is not part of the contract.
        got.sort();
        got
    }

    fn sorted(pointers: &[&str]) -> Vec<String> {
        let mut p: Vec<String> = pointers.iter().map(|s| s.to_string()).collect();
        p.sort();
        p
    }

    #[test]
    fn defaults_are_half_magnitude_with_first_and_last_dense() {
        let spec = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "pipeline": [{"stage": "prune"}]}),
            &[],
        )
        .unwrap();
        let crate::domain::spec::Stage::Prune(p) = &spec.pipeline[0] else {
            panic!("a prune stage");
        };
        assert_eq!(p.method, super::PruneMethod::Magnitude);
        assert_eq!(p.sparsity, 0.5);
        assert!(p.skip_first && p.skip_last && p.finetune.is_none());
    }

    #[test]
    fn options_of_another_method_and_bad_values_are_named() {
        assert_eq!(
            problems(json!({"stage": "prune", "method": "n_m", "sparsity": 0.5, "n": 4, "m": 4})),
            sorted(&["/pipeline/0/sparsity", "/pipeline/0/n"])
        );
        assert_eq!(
            problems(json!({"stage": "prune", "method": "magnitude", "targets": ["heads"]})),
            sorted(&["/pipeline/0/targets"])
        );
        assert_eq!(
            problems(
                json!({"stage": "prune", "method": "structured", "sparsity": 1.0, "targets": ["rows"]})
            ),
            sorted(&["/pipeline/0/sparsity", "/pipeline/0/targets/0"])
        );
        assert_eq!(
            problems(json!({"stage": "prune", "finetune": {"epochs": 0}})),
            sorted(&["/train_dataset_id", "/pipeline/0/finetune/epochs"])
        );
        assert_eq!(
            problems(json!({"stage": "prune", "method": "wavelet"})),
            sorted(&["/pipeline/0/method"])
        );
    }
}
