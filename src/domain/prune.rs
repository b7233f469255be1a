//! Options of the `prune` stage and their validation.
use super::training::{check_keys, needs_train_data, validate_training, TrainingOptions};
use super::validation::{pointer_key, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// Every layer loses the same share.
    #[default]
    PerLayer,
    /// One threshold over all selected layers.
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneImportance {
    #[default]
    L1,
    L2,
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
/// the stage — α·CE(labels) + (1−α)·T²·KL, KL alone without labels — with zeros held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneFinetune {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// `magnitude`: prune in this many steps on the cubic schedule (Zhu & Gupta), training
    /// `epochs / steps` epochs after each; 1 prunes at once then trains.
    #[serde(default = "default_steps")]
    pub steps: u32,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(flatten)]
    pub training: TrainingOptions,
}

fn default_alpha() -> f64 {
    0.5
}
fn default_temperature() -> f64 {
    2.0
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

const KNOWN: &[&str] = &[
    "stage",
    "method",
    "sparsity",
    "scope",
    "n",
    "m",
    "targets",
    "importance",
    "multiple_of",
    "exclude",
    "skip_first",
    "skip_last",
    "finetune",
];

const FINETUNE_KEYS: &[&str] = &["finetune", "alpha", "temperature", "steps", "output"];

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

pub(super) fn validate(
    obj: &Map<String, Value>,
    base: &str,
    spec: &Map<String, Value>,
    provided: &[&str],
    p: &mut Problems,
) {
    for key in obj.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
        p.add(
            format!("{base}/{}", pointer_key(key)),
            format!(
                "unknown option `{key}` for prune; expected one of: {}",
                KNOWN[1..].join(", ")
            ),
        );
    }
    let method = match obj.get("method") {
        None => "magnitude",
        Some(Value::String(m)) if ["magnitude", "n_m", "structured"].contains(&m.as_str()) => {
            m.as_str()
        }
        Some(_) => {
            p.add(
                format!("{base}/method"),
                "`method` must be one of: magnitude, n_m, structured",
            );
            return;
        }
    };
    for (key, owner) in ONLY_FOR {
        if obj.contains_key(*key) && !owner.split(" or ").any(|o| o == method) {
            p.add(
                format!("{base}/{key}"),
                format!("`{key}` applies to method {owner}, not {method}"),
            );
        }
    }
    match obj.get("sparsity") {
        Some(_) if method == "n_m" => p.add(
            format!("{base}/sparsity"),
            "`n_m` sparsity is 1 − n/m; set `n` and `m` instead",
        ),
        Some(v) if !v.as_f64().is_some_and(|s| s > 0.0 && s < 1.0) => p.add(
            format!("{base}/sparsity"),
            "`sparsity` must be a fraction between 0 and 1 (exclusive)",
        ),
        _ => {}
    }
    let int = |key: &str, lo: u64, hi: u64, p: &mut Problems| -> Option<u64> {
        let v = obj.get(key)?;
        match v.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Some(x),
            _ => {
                p.add(
                    format!("{base}/{key}"),
                    format!("`{key}` must be an integer in {lo}..={hi}"),
                );
                None
            }
        }
    };
    let n = int("n", 1, 31, p).unwrap_or(default_n() as u64);
    let m = int("m", 2, 32, p).unwrap_or(default_m() as u64);
    if method == "n_m" && n >= m {
        p.add(format!("{base}/n"), "`n` must be smaller than `m`");
    }
    int("multiple_of", 1, 256, p);
    let one_of = |key: &str, allowed: &[&str], p: &mut Problems| {
        if let Some(v) = obj.get(key) {
            if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
                p.add(
                    format!("{base}/{key}"),
                    format!("`{key}` must be one of: {}", allowed.join(", ")),
                );
            }
        }
    };
    one_of("scope", &["per_layer", "global"], p);
    one_of("importance", &["l1", "l2"], p);
    if let Some(v) = obj.get("targets") {
        match v.as_array() {
            Some(t) if !t.is_empty() => {
                for (i, x) in t.iter().enumerate() {
                    if !x
                        .as_str()
                        .is_some_and(|s| ["channels", "neurons", "heads"].contains(&s))
                    {
                        p.add(
                            format!("{base}/targets/{i}"),
                            "targets are: channels, neurons, heads",
                        );
                    }
                }
            }
            _ => p.add(
                format!("{base}/targets"),
                "`targets` must be a non-empty list of: channels, neurons, heads",
            ),
        }
    }
    if let Some(v) = obj.get("exclude") {
        if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
            p.add(
                format!("{base}/exclude"),
                "`exclude` must be a list of node names",
            );
        }
    }
    for key in ["skip_first", "skip_last"] {
        if obj.get(key).is_some_and(|v| !v.is_boolean()) {
            p.add(
                format!("{base}/{key}"),
                format!("`{key}` must be true or false"),
            );
        }
    }
    match obj.get("finetune") {
        None | Some(Value::Null) => {}
        Some(Value::Object(f)) => {
            needs_train_data(spec, provided, "prune stage with `finetune`", p);
            let at = format!("{base}/finetune");
            check_keys(f, &at, "finetune", FINETUNE_KEYS, p);
            if f.get("alpha")
                .is_some_and(|v| !v.as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)))
            {
                p.add(format!("{at}/alpha"), "`alpha` must be in [0, 1]");
            }
            if f.get("temperature")
                .is_some_and(|v| !v.as_f64().is_some_and(|t| t > 0.0 && t <= 100.0))
            {
                p.add(
                    format!("{at}/temperature"),
                    "`temperature` must be in (0, 100]",
                );
            }
            match f.get("steps") {
                Some(v) if !v.as_u64().is_some_and(|s| (1..=100).contains(&s)) => p.add(
                    format!("{at}/steps"),
                    "`steps` must be an integer in 1..=100",
                ),
                Some(v) if method != "magnitude" && v.as_u64() != Some(1) => p.add(
                    format!("{at}/steps"),
                    "gradual `steps` apply to method magnitude",
                ),
                _ => {}
            }
            validate_training(f, &at, p);
        }
        Some(_) => p.add(
            format!("{base}/finetune"),
            "`finetune` must be an object of training options",
        ),
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::spec::JobSpec;
    use serde_json::json;

    const M: &str = "0193a4f0-8c1e-7b3a-9d2e-5f6a7b8c9d0e";

    fn problems(stage: serde_json::Value) -> Vec<String> {
        JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "pipeline": [stage]}),
            &[],
        )
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.pointer)
        .collect()
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
            vec!["/pipeline/0/sparsity", "/pipeline/0/n"]
        );
        assert_eq!(
            problems(json!({"stage": "prune", "method": "magnitude", "targets": ["heads"]})),
            vec!["/pipeline/0/targets"]
        );
        assert_eq!(
            problems(
                json!({"stage": "prune", "method": "structured", "sparsity": 1.0, "targets": ["rows"]})
            ),
            vec!["/pipeline/0/sparsity", "/pipeline/0/targets/0"]
        );
        assert_eq!(
            problems(json!({"stage": "prune", "finetune": {"epochs": 0}})),
            vec!["/train_dataset_id", "/pipeline/0/finetune/epochs"]
        );
        assert_eq!(
            problems(json!({"stage": "prune", "method": "wavelet"})),
            vec!["/pipeline/0/method"]
        );
    }
}
