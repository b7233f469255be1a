//! The layers quantization schemes rewrite: linear layers (MatMul, Gemm) with a constant weight,
//! and embedding lookups (Gather from a constant table).
use crate::engine::onnx::proto::{NodeProto, TensorProto};
use crate::engine::onnx::rewrite::{attr_f, attr_i, layer_name};
use crate::engine::onnx::tensor::{dims, f32_view, is_f32};
use std::borrow::Cow;
use std::collections::HashMap;

/// y = x @ W (+ bias), with W a float initializer of K rows and N columns.
#[derive(Debug, Clone)]
pub struct Linear {
    pub node: usize,
    pub name: String,
    pub op: String,
    pub input: String,
    pub weight: String,
    /// W is stored as [N, K] (Gemm with transB).
    pub transposed: bool,
    pub k: usize,
    pub n: usize,
    pub bias: Option<String>,
    pub output: String,
}

impl Linear {
    /// W as [K, N], row-major.
    pub fn weight_kn<'w>(&self, w: &'w TensorProto) -> Cow<'w, [f32]> {
        let v = f32_view(w).expect("linear weights are float");
        if !self.transposed {
            return v;
        }
        let mut out = vec![0.0; v.len()];
        for r in 0..self.n {
            for c in 0..self.k {
                out[c * self.n + r] = v[r * self.k + c];
            }
        }
        Cow::Owned(out)
    }
}

/// Why a node is not a linear layer with a constant weight, or the layer.
pub fn linear(
    node: &NodeProto,
    index: usize,
    inits: &HashMap<&str, &TensorProto>,
) -> std::result::Result<Linear, String> {
    let op = node.op_type.clone().unwrap_or_default();
    let weight = node.input.get(1).cloned().unwrap_or_default();
    let Some(w) = inits.get(weight.as_str()).filter(|w| is_f32(w)) else {
        return Err("its weight is not a float32 initializer".into());
    };
    let shape = dims(w);
    if shape.len() != 2 {
        return Err(format!("weight rank {} is not supported", shape.len()));
    }
    let mut transposed = false;
    let mut bias = None;
    if op == "Gemm" {
        if attr_i(node, "transA") == Some(1) {
            return Err("Gemm with transA is not supported".into());
        }
        if attr_f(node, "alpha").is_some_and(|a| a != 1.0)
            || attr_f(node, "beta").is_some_and(|b| b != 1.0)
        {
            return Err("Gemm with alpha or beta other than 1 is not supported".into());
        }
        transposed = attr_i(node, "transB") == Some(1);
        bias = node.input.get(2).filter(|b| !b.is_empty()).cloned();
    }
    let (k, n) = if transposed {
        (shape[1], shape[0])
    } else {
        (shape[0], shape[1])
    };
    Ok(Linear {
        node: index,
        name: layer_name(node, index),
        op,
        input: node.input[0].clone(),
        weight,
        transposed,
        k,
        n,
        bias,
        output: node.output[0].clone(),
    })
}

/// A Gather along axis 0 of a constant [rows, width] float table.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub node: usize,
    pub name: String,
    pub table: String,
    pub ids: String,
    pub rows: usize,
    pub width: usize,
    pub output: String,
}

pub fn embedding(
    node: &NodeProto,
    index: usize,
    inits: &HashMap<&str, &TensorProto>,
) -> std::result::Result<Embedding, String> {
    let table = node.input.first().cloned().unwrap_or_default();
    let Some(t) = inits.get(table.as_str()).filter(|t| is_f32(t)) else {
        return Err("it does not read a float32 table".into());
    };
    let shape = dims(t);
    if shape.len() != 2 || attr_i(node, "axis").unwrap_or(0) != 0 {
        return Err("only lookups along the rows of a 2-D table are quantized".into());
    }
    Ok(Embedding {
        node: index,
        name: layer_name(node, index),
        table,
        ids: node.input[1].clone(),
        rows: shape[0],
        width: shape[1],
        output: node.output[0].clone(),
    })
}

/// Whether a node is a candidate layer for a scheme that handles `op_types` and skips `exclude`.
pub enum Candidate {
    /// Not a layer (another op, or a Gather the scheme was not asked for).
    Skip,
    /// A layer that stays float, and why.
    Float(String),
    /// A layer to quantize.
    Take,
}

/// The checks every scheme makes first: op type (MatMul, Gemm, Gather, Conv), `op_types`,
/// `exclude`.
pub fn candidate(
    node: &NodeProto,
    name: &str,
    op_types: &[String],
    exclude: &[String],
) -> Candidate {
    let op = node.op_type.as_deref().unwrap_or("");
    if !matches!(op, "MatMul" | "Gemm" | "Gather" | "Conv") {
        return Candidate::Skip;
    }
    if !op_types.iter().any(|o| o == op) {
        // A Gather that nobody asked for is index arithmetic as often as an embedding.
        return if op == "Gather" {
            Candidate::Skip
        } else {
            Candidate::Float(format!("{op} is not in op_types"))
        };
    }
    if exclude.iter().any(|e| e == name) {
        return Candidate::Float("excluded".into());
    }
    Candidate::Take
}
