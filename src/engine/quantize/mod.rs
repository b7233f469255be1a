//! Quantization schemes, one file each, behind [`quantize`]. Every output is checked by loading
//! it in ONNX Runtime before it is returned.
pub mod bias_correction;
pub mod budget;
pub mod calibrate;
pub mod dynamic;
mod embedding;
pub mod fp16;
pub mod gptq;
pub mod latency_gate;
pub mod layers;
pub mod opset;
pub mod params;
pub mod prepare;
pub mod qat;
pub mod qdq;
pub mod weight_only;

use crate::engine::dataset::Dataset;
use crate::engine::onnx::proto::{ModelProto, NodeProto};
use crate::engine::onnx::{load_model_bytes, rewrite, LoadedModel};
use crate::engine::runtime::Runtime;
use crate::engine::{EngineError, Progress, Result, SubProgress};
pub use dynamic::DynamicOptions;
pub use latency_gate::{compare_latency, keep_quantized, SLOWER_TOLERANCE};
use prost::Message;
pub use qdq::StaticOptions;
use std::collections::HashSet;
pub use weight_only::WeightOnlyOptions;

/// What happened to one candidate layer, for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDecision {
    pub node: String,
    pub op: String,
    pub precision: String,
    pub reason: String,
    /// Accuracy lost when this layer alone is quantized (measured by the accuracy budget).
    pub sensitivity: Option<f64>,
}

impl LayerDecision {
    pub fn new(node: &str, op: &str, precision: &str, reason: String) -> Self {
        Self {
            node: node.into(),
            op: op.into(),
            precision: precision.into(),
            reason,
            sensitivity: None,
        }
    }
}

/// A quantization scheme and its options.
#[derive(Debug, Clone)]
pub enum Scheme {
    Static(StaticOptions),
    Dynamic(DynamicOptions),
    WeightOnly(WeightOnlyOptions),
    Fp16 { keep_io_types: bool },
}

impl Scheme {
    /// What the scheme writes, for notes.
    pub fn describe(&self) -> String {
        match self {
            Scheme::Static(_) => "static int8 QDQ".into(),
            Scheme::Dynamic(_) => "dynamic int8 (DynamicQuantizeLinear + MatMulInteger)".into(),
            Scheme::WeightOnly(o) if o.bits == 4 => {
                format!("weight-only int4 (MatMulNBits, blocks of {})", o.block_size)
            }
            Scheme::WeightOnly(_) => "weight-only int8 (DequantizeLinear)".into(),
            Scheme::Fp16 { .. } => "float16".into(),
        }
    }
}

/// True when the graph has convolutions: `mode: auto` then quantizes statically.
pub fn prefers_static(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type.as_deref() == Some("Conv")))
}

/// A quantized model and how it was made.
pub struct Quantized {
    pub model: LoadedModel,
    pub layers: Vec<LayerDecision>,
    pub notes: Vec<String>,
    pub calibration_samples: usize,
}

/// Calibration rows for static quantization.
pub struct CalibrationData<'a> {
    pub data: &'a Dataset,
    pub samples: usize,
}

/// A model prepared for one scheme: graph preparation done and, for static quantization,
/// activations calibrated once, so that any subset of layers can be built without recalibrating
/// (the accuracy budget and the speed search build many).
pub struct Prepared {
    pub scheme: Scheme,
    pub model: ModelProto,
    pub notes: Vec<String>,
    ranges: Option<calibrate::Ranges>,
    /// Ranges of the scheme's `also_try` methods, from the same calibration pass.
    alternatives: Vec<(calibrate::RangeMethod, calibrate::Ranges)>,
    pub calibration_samples: usize,
    /// Bias shifts of static int8 layers ([`bias_correction`]); empty until computed.
    corrections: qdq::BiasCorrections,
    /// Int8 weights rounded by GPTQ ([`gptq`]); empty: nearest rounding.
    rounded: qdq::RoundedWeights,
}

impl Prepared {
    pub fn new(
        rt: &Runtime,
        model: &LoadedModel,
        scheme: &Scheme,
        calibration: Option<CalibrationData<'_>>,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let mut proto = model.proto.clone();
        let mut notes = Vec::new();
        let moved = prepare::constants_to_initializers(&mut proto);
        if moved > 0 {
            notes.push(format!(
                "moved {moved} Constant node tensor(s) into initializers"
            ));
        }
        let mut scheme = scheme.clone();
        if matches!(scheme, Scheme::Static(_) | Scheme::Dynamic(_)) {
            let removed = prepare::remove_identities(&mut proto);
            if removed > 0 {
                notes.push(format!("removed {removed} Identity node(s)"));
            }
            let labels = prepare::simplify_label_lookups(&mut proto);
            if labels > 0 {
                notes.push(format!(
                    "rewrote {labels} label lookup(s) (ArgMax -> ArrayFeatureExtractor over classes 0..n-1 -> Reshape -> Cast) as one ArgMax"
                ));
            }
        }
        if let Scheme::Static(StaticOptions {
            reduce_range: true, ..
        })
        | Scheme::Dynamic(DynamicOptions {
            reduce_range: true, ..
        }) = &scheme
        {
            notes.push(
                "int8 weights use 7 bits, [-63, 63] (reduce_range: ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI add pairs of products in saturating 16-bit arithmetic)".into(),
            );
        }
        if !matches!(scheme, Scheme::Fp16 { .. }) {
            let folded = prepare::fold_batch_norms(&mut proto);
            if folded > 0 {
                notes.push(format!(
                    "folded {folded} BatchNormalization node(s) into the preceding Conv"
                ));
            }
        }
        let wants_13 = match &scheme {
            Scheme::Static(o) => o.per_channel,
            Scheme::WeightOnly(o) => o.bits == 8,
            _ => false,
        };
        let before = rewrite::default_opset(&proto);
        if wants_13 && (11..13).contains(&before) && opset::upgrade_to_13(&mut proto)? {
            notes.push(format!(
                "upgraded the model from opset {before} to 13 for per-channel DequantizeLinear"
            ));
        }
        let opset = rewrite::default_opset(&proto);
        let needs = match &scheme {
            Scheme::Static(_) => 10,
            Scheme::Dynamic(_) => 11,
            Scheme::WeightOnly(o) if o.bits == 8 => 13,
            _ => 1,
        };
        if opset < needs {
            return Err(EngineError::InvalidModel(format!(
                "opset {opset} is too old for {} (needs {needs} or later)",
                scheme.describe()
            )));
        }
        if let Scheme::Static(_) = &scheme {
            let adds = prepare::fold_conv_bias_adds(&mut proto);
            if adds > 0 {
                notes.push(format!(
                    "folded {adds} per-channel Add(s) into the preceding Conv's bias"
                ));
            }
            let fused = prepare::fuse_matmul_bias(&mut proto);
            if fused > 0 {
                notes.push(format!(
                    "fused {fused} MatMul + bias Add pair(s) into Gemm, which ONNX Runtime runs as one QGemm"
                ));
            }
            let split = prepare::decompose_hard_activations(&mut proto);
            if split > 0 {
                notes.push(format!(
                    "rewrote {split} HardSwish/HardSigmoid node(s) as Add, Clip and Mul, which ONNX Runtime runs in integers (QLinearAdd, QLinearMul)"
                ));
            }
        }
        if let Scheme::Static(o) = &mut scheme {
            if o.per_channel && opset < 13 {
                o.per_channel = false;
                notes.push(format!("the model's opset {opset} predates per-channel DequantizeLinear (13): weights were quantized per tensor"));
            }
        }
        let mut ranges = None;
        let mut alternatives = Vec::new();
        let mut calibration_samples = 0;
        if let Scheme::Static(o) = &scheme {
            let c = calibration.ok_or_else(|| EngineError::InvalidOption {
                option: "calibration".into(),
                problem: "static quantization needs calibration data".into(),
            })?;
            let (targets, _) = qdq::plan(&proto, o);
            let (names, _) = qdq::activations(&proto, &targets);
            if !names.is_empty() {
                let loaded = LoadedModel {
                    bytes: proto.encode_to_vec().into(),
                    proto: proto.clone(),
                };
                let mut calibrator =
                    calibrate::Calibrator::new(rt, &loaded, c.data, &names, c.samples)?;
                let sub = SubProgress {
                    parent: progress,
                    start: 0.0,
                    span: 1.0,
                };
                let mut r = if o.also_try.is_empty() {
                    match o.calibration {
                        Some(m) => calibrator.histogram_ranges(m, &sub)?,
                        None => calibrator.min_max(&sub)?,
                    }
                } else {
                    let h = calibrator.histograms(&sub)?;
                    alternatives = o.also_try.iter().map(|&m| (m, h.ranges(m))).collect();
                    o.calibration.map_or_else(|| h.min_max(), |m| h.ranges(m))
                };
                qdq::fold_activation_ranges(&proto, &mut r);
                for (_, a) in alternatives.iter_mut() {
                    qdq::fold_activation_ranges(&proto, a);
                }
                ranges = Some(r);
                calibration_samples = c.samples.min(c.data.summary.samples as usize);
            }
        }
        Ok(Self {
            scheme,
            model: proto,
            notes,
            ranges,
            alternatives,
            calibration_samples,
            corrections: Default::default(),
            rounded: Default::default(),
        })
    }

    /// How activations were calibrated (static schemes).
    pub fn calibration(&self) -> Option<calibrate::RangeMethod> {
        match &self.scheme {
            Scheme::Static(o) => o.calibration,
            _ => None,
        }
    }

    /// The same preparation with each of the scheme's `also_try` calibrations instead.
    pub fn alternatives(&self) -> Vec<Prepared> {
        let Scheme::Static(o) = &self.scheme else {
            return Vec::new();
        };
        self.alternatives
            .iter()
            .map(|(m, r)| Prepared {
                scheme: Scheme::Static(StaticOptions {
                    calibration: Some(*m),
                    also_try: Vec::new(),
                    ..o.clone()
                }),
                model: self.model.clone(),
                notes: self.notes.clone(),
                ranges: Some(r.clone()),
                alternatives: Vec::new(),
                calibration_samples: self.calibration_samples,
                corrections: Default::default(),
                // GPTQ reads the float model's inputs, not the activation ranges.
                rounded: self.rounded.clone(),
            })
            .collect()
    }

    /// Builds the model with every candidate layer quantized except those in `float`.
    pub fn build(&self, float: &HashSet<String>) -> Result<(ModelProto, Vec<LayerDecision>)> {
        let exclude = |base: &[String]| -> Vec<String> {
            base.iter().cloned().chain(float.iter().cloned()).collect()
        };
        Ok(match &self.scheme {
            Scheme::Static(o) => {
                let o = StaticOptions {
                    exclude: exclude(&o.exclude),
                    ..o.clone()
                };
                let (targets, layers) = qdq::plan(&self.model, &o);
                let with_tables = |proto: ModelProto, mut layers: Vec<LayerDecision>| {
                    if !o.op_types.iter().any(|t| t == "Gather") {
                        return (proto, layers);
                    }
                    let (proto, lookups) =
                        embedding::quantize_tables(&proto, &o.exclude, o.tables_per_row);
                    layers.extend(lookups);
                    (proto, layers)
                };
                if targets.is_empty() {
                    return Ok(with_tables(self.model.clone(), layers));
                }
                let (names, constants) = qdq::activations(&self.model, &targets);
                let all = self.ranges.as_ref().expect("static schemes are calibrated");
                let ranges = names
                    .iter()
                    .filter_map(|n| all.get(n).map(|r| (n.clone(), *r)))
                    .collect();
                let proto = qdq::rewrite(
                    &self.model,
                    &targets,
                    &constants,
                    &ranges,
                    &o,
                    &self.corrections,
                    &self.rounded,
                )?;
                with_tables(proto, layers)
            }
            Scheme::Dynamic(o) => dynamic::quantize_dynamic(
                &self.model,
                &DynamicOptions {
                    exclude: exclude(&o.exclude),
                    ..o.clone()
                },
            ),
            Scheme::WeightOnly(o) => weight_only::quantize_weight_only(
                &self.model,
                &WeightOnlyOptions {
                    exclude: exclude(&o.exclude),
                    ..o.clone()
                },
            )?,
            Scheme::Fp16 { keep_io_types } => {
                let (proto, n) = fp16::convert_fp16(&self.model, *keep_io_types)?;
                let layer = LayerDecision::new(
                    "(all)",
                    "*",
                    "float16",
                    format!("{n} float32 tensors converted"),
                );
                (proto, vec![layer])
            }
        })
    }

    /// The same preparation with one scale per tensor (or, with `tables_only`, per embedding
    /// table only) when the scheme chose granularity automatically.
    pub fn per_tensor(&self, tables_only: bool) -> Option<Prepared> {
        let scheme = match &self.scheme {
            Scheme::Static(o) if o.per_channel && o.auto_granularity => {
                Scheme::Static(StaticOptions {
                    per_channel: tables_only,
                    auto_granularity: tables_only,
                    tables_per_row: false,
                    ..o.clone()
                })
            }
            Scheme::Dynamic(o) if o.per_channel && o.auto_granularity => {
                Scheme::Dynamic(DynamicOptions {
                    per_channel: tables_only,
                    auto_granularity: tables_only,
                    tables_per_row: false,
                    ..o.clone()
                })
            }
            _ => return None,
        };
        Some(Prepared {
            scheme,
            model: self.model.clone(),
            notes: self.notes.clone(),
            ranges: self.ranges.clone(),
            alternatives: self.alternatives.clone(),
            calibration_samples: self.calibration_samples,
            // Measured for per-channel weights: one scale per tensor errs differently.
            corrections: Default::default(),
            rounded: Default::default(),
        })
    }

    /// The same preparation (scheme, calibrated ranges) over `model`, a model with the same
    /// graph and other weights (quantization-aware training's).
    pub fn with_model(&self, model: ModelProto) -> Prepared {
        Prepared {
            scheme: self.scheme.clone(),
            model,
            notes: self.notes.clone(),
            ranges: self.ranges.clone(),
            alternatives: Vec::new(),
            calibration_samples: self.calibration_samples,
            // Training moved the weights the corrections were measured for.
            corrections: Default::default(),
            rounded: Default::default(),
        }
    }

    /// Layers whose int8 weights GPTQ rounded.
    pub fn rounded_layers(&self) -> usize {
        self.rounded.len()
    }

    /// Back to nearest rounding (and the bias corrections measured with GPTQ's weights).
    pub fn clear_rounding(&mut self) {
        self.rounded.clear();
        self.corrections.clear();
    }

    /// The calibrated activation ranges (static schemes).
    pub fn ranges(&self) -> Option<&calibrate::Ranges> {
        self.ranges.as_ref()
    }

    /// Layers the scheme quantizes when nothing is kept float.
    pub fn candidates(&self) -> Result<Vec<String>> {
        let (_, layers) = self.build(&HashSet::new())?;
        Ok(layers
            .into_iter()
            .filter(|l| l.precision.starts_with("int"))
            .map(|l| l.node)
            .collect())
    }

    /// How many weights each named layer holds (its weight initializer's elements; 1 for names
    /// not in the graph): what keeping it float costs in size. A layer without weights (a MatMul
    /// of two activations) costs no size but time: it counts as the graph's median layer, so
    /// that searches ordering layers by harm per weight place it by its harm.
    pub fn weight_elements(&self, names: &[String]) -> Vec<usize> {
        let Some(graph) = self.model.graph.as_ref() else {
            return vec![1; names.len()];
        };
        let inits = rewrite::initializers(graph);
        let layer =
            |n: &NodeProto| matches!(n.op_type.as_deref(), Some("Conv" | "MatMul" | "Gemm"));
        let elements = |n: &NodeProto| -> Option<usize> {
            let w = n.input.get(1).and_then(|w| inits.get(w.as_str()))?;
            Some(
                crate::engine::onnx::tensor::dims(w)
                    .iter()
                    .product::<usize>()
                    .max(1),
            )
        };
        let mut sizes: Vec<usize> = graph
            .node
            .iter()
            .filter(|n| layer(n))
            .filter_map(elements)
            .collect();
        sizes.sort_unstable();
        let median = sizes.get(sizes.len() / 2).copied().unwrap_or(1);
        let by_name: std::collections::HashMap<String, usize> = graph
            .node
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let e = match elements(n) {
                    Some(e) => e,
                    None if n.op_type.as_deref() == Some("MatMul") => median,
                    None => 1,
                };
                (rewrite::layer_name(n, i), e)
            })
            .collect();
        names
            .iter()
            .map(|n| by_name.get(n).copied().unwrap_or(1))
            .collect()
    }
}

/// Serializes `proto` and checks that ONNX Runtime loads it.
pub fn finish(rt: &Runtime, proto: &ModelProto) -> Result<LoadedModel> {
    let bytes = proto.encode_to_vec();
    // ONNX Runtime must accept what we wrote before anyone sees it.
    rt.check(&bytes).map_err(|e| {
        EngineError::Runtime(format!(
            "the written model does not load in ONNX Runtime: {e}"
        ))
    })?;
    load_model_bytes(bytes.into())
}

/// Quantizes every candidate layer with `scheme`.
pub fn quantize(
    rt: &Runtime,
    model: &LoadedModel,
    scheme: &Scheme,
    calibration: Option<CalibrationData<'_>>,
    progress: &dyn Progress,
) -> Result<Quantized> {
    let sub = SubProgress {
        parent: progress,
        start: 0.0,
        span: 0.9,
    };
    let prepared = Prepared::new(rt, model, scheme, calibration, &sub)?;
    let (proto, layers) = prepared.build(&HashSet::new())?;
    let mut notes = prepared.notes.clone();
    if !layers.iter().any(|l| l.precision != "float") {
        notes.push("no layer could be quantized; the model is unchanged".into());
    }
    let model = finish(rt, &proto)?;
    progress.update(1.0)?;
    Ok(Quantized {
        model,
        layers,
        notes,
        calibration_samples: prepared.calibration_samples,
    })
}

/// Static int8 quantization in QDQ form, calibrated over `samples` rows of `calibration`.
pub fn quantize_static(
    rt: &Runtime,
    model: &LoadedModel,
    calibration: &Dataset,
    samples: usize,
    opts: &StaticOptions,
    progress: &dyn Progress,
) -> Result<Quantized> {
    quantize(
        rt,
        model,
        &Scheme::Static(opts.clone()),
        Some(CalibrationData {
            data: calibration,
            samples,
        }),
        progress,
    )
}
