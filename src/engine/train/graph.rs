//! [`TrainGraph`]: the part of an ONNX graph that computes the requested outputs, with its weights
//! as candle variables.
use super::ops::{self, Ctx};
use super::{candle_error, tensors, SUPPORTED_OPS};
use crate::engine::onnx::proto::{GraphProto, ModelProto, NodeProto};
use crate::engine::onnx::tensor::{dims, f32_tensor};
use crate::engine::{EngineError, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub use super::ops::Mode;

/// Which inputs of an op are weights the training may change. Scalars (epsilons, exponents,
/// scaling constants of decomposed ops) never are.
fn weight_inputs(op: &str) -> &'static [usize] {
    match op {
        "Conv" | "ConvTranspose" | "Gemm" | "BatchNormalization" | "LayerNormalization" => &[1, 2],
        "MatMul" | "Add" | "Sub" | "Mul" => &[0, 1],
        "Gather" => &[0],
        _ => &[],
    }
}

/// Rewrites named values as the forward pass produces them: weights and constants as they are
/// read, graph inputs as they are fed, node outputs as they are computed. Fake quantization
/// (quantization-aware training) is one.
pub trait ValueHook: Send + Sync {
    /// The value nodes should read instead of `value`; the hook returns it unchanged for names it
    /// does not know.
    fn apply(&self, name: &str, value: Tensor, mode: Mode) -> Result<Tensor>;
}

/// Saved weights (see [`TrainGraph::snapshot`]).
pub struct Snapshot {
    vars: Vec<Tensor>,
    running: HashMap<String, Tensor>,
}

/// Indices of the nodes that compute `outputs`, in graph order.
fn needed_nodes(graph: &GraphProto, outputs: &[String]) -> BTreeSet<usize> {
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed = BTreeSet::new();
    let mut stack: Vec<&str> = outputs.iter().map(String::as_str).collect();
    while let Some(name) = stack.pop() {
        if let Some(&i) = producer.get(name) {
            if needed.insert(i) {
                stack.extend(graph.node[i].input.iter().map(String::as_str));
            }
        }
    }
    needed
}

fn unsupported_among<'n>(nodes: impl Iterator<Item = &'n NodeProto>) -> BTreeSet<String> {
    nodes
        .filter(|n| {
            n.domain
                .as_deref()
                .is_some_and(|d| !d.is_empty() && d != "ai.onnx")
                || !SUPPORTED_OPS.contains(&n.op_type.as_deref().unwrap_or_default())
        })
        .map(|n| match n.domain.as_deref() {
            Some(d) if !d.is_empty() && d != "ai.onnx" => {
                format!("{d}.{}", n.op_type.as_deref().unwrap_or_default())
            }
            _ => n.op_type.clone().unwrap_or_default(),
        })
        .collect()
}

/// For each graph output, the operators feeding it that training cannot run (outputs that
/// training can run are left out).
pub fn untrainable_ops(graph: &GraphProto) -> BTreeMap<String, Vec<String>> {
    graph
        .output
        .iter()
        .filter_map(|o| o.name.clone())
        .filter_map(|o| {
            let needed = needed_nodes(graph, std::slice::from_ref(&o));
            let bad = unsupported_among(needed.iter().map(|&i| &graph.node[i]));
            (!bad.is_empty()).then(|| (o, bad.into_iter().collect()))
        })
        .collect()
}

pub struct TrainGraph {
    model: ModelProto,
    nodes: Vec<NodeProto>,
    /// Trainable weights, by initializer name, in graph order.
    vars: Vec<(String, Var)>,
    consts: HashMap<String, Tensor>,
    /// BatchNormalization running means and variances (initializer names), which training
    /// forward passes update.
    running: Mutex<HashMap<String, Tensor>>,
    outputs: Vec<String>,
    opset: i64,
    device: Device,
    /// Applied to every value of the forward pass (see [`ValueHook`]).
    hook: Option<Arc<dyn ValueHook>>,
    /// BatchNormalization keeps its running statistics in training passes too.
    frozen_batch_norm: std::sync::atomic::AtomicBool,
    /// Values (elements) computed by forward passes since the last [`TrainGraph::probe`].
    computed: std::sync::atomic::AtomicUsize,
}

impl TrainGraph {
    /// The nodes computing `outputs` (every graph output when empty), checked against the
    /// supported op set; float weights become variables.
    pub fn new(model: &ModelProto, outputs: &[String]) -> Result<Self> {
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| EngineError::InvalidModel("no graph".into()))?;
        let outputs: Vec<String> = if outputs.is_empty() {
            graph.output.iter().filter_map(|o| o.name.clone()).collect()
        } else {
            outputs.to_vec()
        };
        for o in &outputs {
            let is_input = graph.input.iter().any(|i| i.name.as_deref() == Some(o));
            let produced = graph.node.iter().any(|n| n.output.contains(o));
            if !produced && !is_input {
                return Err(EngineError::InvalidOption {
                    option: "output".into(),
                    problem: format!("the model has no tensor `{o}`"),
                });
            }
        }
        let needed = needed_nodes(graph, &outputs);
        let nodes: Vec<NodeProto> = needed.iter().map(|&i| graph.node[i].clone()).collect();
        let unsupported = unsupported_among(nodes.iter());
        if !unsupported.is_empty() {
            return Err(EngineError::InvalidModel(format!(
                "training does not support the op(s) {}; supported: {}",
                unsupported.into_iter().collect::<Vec<_>>().join(", "),
                SUPPORTED_OPS.join(", ")
            )));
        }
        let mut trainable = HashSet::new();
        let mut running_names = HashSet::new();
        for n in &nodes {
            let op = n.op_type.as_deref().unwrap_or_default();
            for &k in weight_inputs(op) {
                if let Some(name) = n.input.get(k) {
                    trainable.insert(name.as_str());
                }
            }
            if op == "BatchNormalization" {
                running_names.extend(n.input.iter().skip(3).take(2).map(String::as_str));
            }
        }
        let used: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .collect();
        let device = Device::Cpu;
        let (mut vars, mut consts, mut running) = (Vec::new(), HashMap::new(), HashMap::new());
        for init in &graph.initializer {
            let name = init.name.clone().unwrap_or_default();
            if !used.contains(name.as_str()) {
                continue;
            }
            let t = tensors::from_proto(init, &device)?;
            let is_weight = t.dtype() == DType::F32 && t.elem_count() > 1;
            if running_names.contains(name.as_str()) {
                running.insert(name, t);
            } else if is_weight && trainable.contains(name.as_str()) {
                let var = Var::from_tensor(&t).map_err(|e| candle_error(&name, e))?;
                vars.push((name, var));
            } else {
                consts.insert(name, t);
            }
        }
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.as_deref().unwrap_or_default().is_empty())
            .and_then(|o| o.version)
            .unwrap_or(13);
        Ok(Self {
            model: model.clone(),
            nodes,
            vars,
            consts,
            running: Mutex::new(running),
            outputs,
            opset,
            device,
            hook: None,
            frozen_batch_norm: false.into(),
            computed: 0.into(),
        })
    }

    /// Runs every forward value through `hook` from now on.
    pub fn set_hook(&mut self, hook: Arc<dyn ValueHook>) {
        self.hook = Some(hook);
    }

    /// Whether training passes normalise with the running BatchNormalization statistics (and
    /// leave them as they are) instead of each batch's.
    pub fn set_frozen_batch_norm(&self, frozen: bool) {
        self.frozen_batch_norm
            .store(frozen, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable variables, for an optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Trainable parameter count.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Runs the graph on `feeds` (graph input name -> tensor) and returns the requested outputs
    /// in order.
    pub fn forward(&self, feeds: &HashMap<String, Tensor>, mode: Mode) -> Result<Vec<Tensor>> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for (name, v) in &self.vars {
            values.insert(name, v.as_tensor().clone());
        }
        for (name, t) in &self.consts {
            values.insert(name, t.clone());
        }
        let running = self
            .running
            .lock()
            .expect("running statistics lock")
            .clone();
        for (name, t) in &running {
            values.insert(name, t.clone());
        }
        for (name, t) in feeds {
            values.insert(name, t.clone());
        }
        let hook = |name: &str, t: Tensor| match &self.hook {
            Some(h) => h.apply(name, t, mode),
            None => Ok(t),
        };
        // Every value the pass computes (node outputs, and what the hook makes of them or of the
        // weights) lives as long as the pass's result: what a training pass holds grows with it.
        let mut computed = 0usize;
        if self.hook.is_some() {
            for (name, t) in values.iter_mut() {
                let hooked = hook(name, t.clone())?;
                if hooked.id() != t.id() {
                    computed += hooked.elem_count();
                }
                *t = hooked;
            }
        }
        let ctx = Ctx {
            mode,
            opset: self.opset,
            running: &self.running,
            frozen_batch_norm: self
                .frozen_batch_norm
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        for n in &self.nodes {
            let inputs: Vec<Option<Tensor>> = n
                .input
                .iter()
                .map(|i| {
                    if i.is_empty() {
                        return Ok(None);
                    }
                    values.get(i.as_str()).cloned().map(Some).ok_or_else(|| {
                        EngineError::InvalidModel(format!("tensor `{i}` is not computed or fed"))
                    })
                })
                .collect::<Result<_>>()?;
            let context = || {
                format!(
                    "node `{}` ({})",
                    n.name.as_deref().unwrap_or_default(),
                    n.op_type.as_deref().unwrap_or_default()
                )
            };
            let out = ops::run(n, &inputs, &ctx).map_err(|e| candle_error(&context(), e))?;
            for (name, t) in n.output.iter().zip(out) {
                if !name.is_empty() {
                    computed += t.elem_count();
                    let hooked = hook(name, t.clone())?;
                    if hooked.id() != t.id() {
                        computed += hooked.elem_count();
                    }
                    values.insert(name, hooked);
                }
            }
        }
        self.computed
            .fetch_add(computed, std::sync::atomic::Ordering::Relaxed);
        self.outputs
            .iter()
            .map(|o| {
                values
                    .get(o.as_str())
                    .cloned()
                    .ok_or_else(|| EngineError::InvalidModel(format!("output `{o}` not computed")))
            })
            .collect()
    }

    /// The values (elements) the forward passes of `pass` compute, `pass` run as if it had not
    /// run: the BatchNormalization running statistics it updates are put back.
    pub fn probe<T>(&self, pass: impl FnOnce() -> Result<T>) -> Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let running = self
            .running
            .lock()
            .expect("running statistics lock")
            .clone();
        self.computed.store(0, Relaxed);
        let outcome = pass();
        *self.running.lock().expect("running statistics lock") = running;
        outcome?;
        Ok(self.computed.load(Relaxed))
    }

    /// A copy of every variable and running statistic.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let copy = |t: &Tensor| t.copy().map_err(|e| candle_error("snapshot", e));
        Ok(Snapshot {
            vars: self
                .vars
                .iter()
                .map(|(_, v)| copy(v.as_tensor()))
                .collect::<Result<_>>()?,
            running: self
                .running
                .lock()
                .expect("running statistics lock")
                .iter()
                .map(|(k, t)| Ok((k.clone(), copy(t)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Puts a [`snapshot`](Self::snapshot) back.
    pub fn restore(&self, s: &Snapshot) -> Result<()> {
        for ((_, v), t) in self.vars.iter().zip(&s.vars) {
            v.set(t).map_err(|e| candle_error("restore", e))?;
        }
        *self.running.lock().expect("running statistics lock") = s.running.clone();
        Ok(())
    }

    /// The model with the trained weights (and updated BatchNormalization statistics) written
    /// back into its initializers; everything else is unchanged.
    pub fn export(&self) -> Result<ModelProto> {
        let mut model = self.model.clone();
        let running = self.running.lock().expect("running statistics lock");
        let mut new: HashMap<&str, &Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_tensor()))
            .collect();
        new.extend(running.iter().map(|(n, t)| (n.as_str(), t)));
        let graph = model.graph.as_mut().expect("checked in new");
        for init in graph.initializer.iter_mut() {
            let Some(t) = init.name.as_deref().and_then(|n| new.get(n)) else {
                continue;
            };
            let values = tensors::to_f32s(t).map_err(|e| candle_error("export", e))?;
            *init = f32_tensor(
                init.name.as_deref().unwrap_or_default(),
                &dims(init),
                &values,
            );
        }
        Ok(model)
    }
}
