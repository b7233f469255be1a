//! Weight-only quantization: activations stay float. int8 weights sit behind DequantizeLinear
//! (per output channel); int4 weights are stored in blocks along K in ONNX Runtime's MatMulNBits
//! (com.microsoft), which dequantizes block by block inside the kernel. For size, and for GPU
//! runtimes whose weight-only kernels are fast.
use super::embedding::{quantize_lookup, Tables};
use super::layers::{candidate, embedding, linear, Candidate, Linear};
use super::params::{quantize_weights_per_channel, round_even};
use super::LayerDecision;
use crate::engine::onnx::proto::{ModelProto, TensorProto};
use crate::engine::onnx::rewrite::{
    default_opset, initializers, int_attr, layer_name, node, Rewrite, MS_DOMAIN,
};
use crate::engine::onnx::tensor::{dims, f32_le, f32_tensor, i8_tensor_owned, is_f32, u8_tensor};
use crate::engine::{EngineError, Result};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct WeightOnlyOptions {
    /// 8 or 4.
    pub bits: u32,
    /// int4: weights per block along K sharing a scale (16..=256, a power of two).
    pub block_size: usize,
    /// int4: symmetric blocks (zero point 8, none stored) instead of per-block zero points.
    pub symmetric: bool,
    pub op_types: Vec<String>,
    pub exclude: Vec<String>,
}

pub fn quantize_weight_only(
    model: &ModelProto,
    opts: &WeightOnlyOptions,
) -> Result<(ModelProto, Vec<LayerDecision>)> {
    if opts.bits == 8 && default_opset(model) < 13 {
        return Err(EngineError::InvalidModel(
            "per-channel DequantizeLinear needs opset 13 or later".into(),
        ));
    }
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = initializers(graph);
    let mut rw = Rewrite::default();
    let mut decisions = Vec::new();
    let mut tables = Tables::new();
    let mut stored: HashMap<(String, bool), Vec<String>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or("");
        let name = layer_name(n, i);
        let mut decide = |precision: &str, reason: String| {
            decisions.push(LayerDecision::new(&name, op, precision, reason));
        };
        match candidate(n, &name, &opts.op_types, &opts.exclude) {
            Candidate::Skip => continue,
            Candidate::Float(reason) => {
                decide("float", reason);
                continue;
            }
            Candidate::Take => {}
        }
        if op == "Gather" {
            if let Ok(e) = embedding(n, i, &inits) {
                quantize_lookup(
                    &mut rw,
                    &mut tables,
                    &e,
                    inits[e.table.as_str()],
                    true,
                    None,
                );
                decide(
                    "int8",
                    "embedding rows in int8, dequantized after the lookup".into(),
                );
            }
            continue;
        }
        if op == "Conv" {
            match n.input.get(1).and_then(|w| inits.get(w.as_str())) {
                Some(w) if opts.bits == 8 && is_f32(w) && w.dims.len() >= 3 => {
                    let dq = int8_behind_dq(&mut rw, &n.input[1], w, 0, i);
                    let mut conv = n.clone();
                    conv.input[1] = dq;
                    rw.instead(i, vec![conv]);
                    decide("int8", "int8 weights behind DequantizeLinear".into());
                }
                Some(_) if opts.bits == 4 => decide(
                    "float",
                    "4-bit weights are for MatMul/Gemm (MatMulNBits); convolutions stay float"
                        .into(),
                ),
                _ => decide("float", "its weight is not a float32 initializer".into()),
            }
            continue;
        }
        let l = match linear(n, i, &inits) {
            Ok(l) => l,
            Err(reason) => {
                decide("float", reason);
                continue;
            }
        };
        let w = inits[l.weight.as_str()];
        if opts.bits == 8 {
            let axis = if l.transposed { 0 } else { 1 };
            let dq = stored
                .entry((l.weight.clone(), false))
                .or_insert_with(|| vec![int8_behind_dq(&mut rw, &l.weight, w, axis, i)])[0]
                .clone();
            let mut new = n.clone();
            new.input[1] = dq;
            rw.instead(i, vec![new]);
            decide("int8", "int8 weights behind DequantizeLinear".into());
        } else {
            let inputs = stored
                .entry((l.weight.clone(), true))
                .or_insert_with(|| store_int4(&mut rw, &l, w, opts))
                .clone();
            emit_matmul_nbits(&mut rw, &l, inputs, opts);
            decide(
                "int4",
                format!("int4 blocks of {} weights (MatMulNBits)", opts.block_size),
            );
        }
    }
    if opts.bits == 4 {
        rw.domain(MS_DOMAIN, 1);
    }
    let mut out = model.clone();
    rw.apply(&mut out);
    Ok((out, decisions))
}

/// Stores `w` as int8 per channel along `axis`; returns the name of the dequantized value.
/// The DequantizeLinear goes before node `at`, its first reader.
fn int8_behind_dq(rw: &mut Rewrite, name: &str, w: &TensorProto, axis: usize, at: usize) -> String {
    let shape = dims(w);
    let (scales, q) = quantize_weights_per_channel(&f32_le(w).expect("float"), &shape, axis);
    let [qn, sn, dqn] = ["q", "s", "dq"].map(|s| format!("{name}_{s}"));
    rw.init(i8_tensor_owned(&qn, &shape, q));
    rw.scales(&sn, &[scales.len()], &scales, at);
    // Symmetric: zero point 0 is DequantizeLinear's default for int8, so none is stored.
    rw.before(
        at,
        node(
            "DequantizeLinear",
            format!("{name}_DQ"),
            vec![qn, sn],
            dqn.clone(),
            vec![int_attr("axis", axis as i64)],
        ),
    );
    rw.replaced(name);
    dqn
}

/// int4 blocks in MatMulNBits' layout: B is [N, blocks, block_size / 2] bytes (two weights per
/// byte, the lower K index in the low nibble), scales [N * blocks], zero points packed the same
/// way per column. Returns the names of B, scales and (asymmetric) zero points.
fn store_int4(
    rw: &mut Rewrite,
    l: &Linear,
    w: &TensorProto,
    opts: &WeightOnlyOptions,
) -> Vec<String> {
    let (q, scales, zps) = pack_int4(&l.weight_kn(w), l.k, l.n, opts.block_size, opts.symmetric);
    let blocks = l.k.div_ceil(opts.block_size);
    let [bn, sn, zn] =
        ["int4", "int4_scale", "int4_zero_point"].map(|s| format!("{}_{s}", l.weight));
    rw.init(u8_tensor(&bn, &[l.n, blocks, opts.block_size / 2], &q));
    rw.init(f32_tensor(&sn, &[l.n * blocks], &scales));
    rw.replaced(&l.weight);
    let mut names = vec![bn, sn];
    if let Some(z) = zps {
        rw.init(u8_tensor(&zn, &[z.len()], &z));
        names.push(zn);
    }
    names
}

/// Block-wise 4-bit quantization of W [K, N] along K. Asymmetric blocks map [min, max] (with 0
/// inside) onto 0..=15; symmetric ones map ±max|w| onto 1..=15 around 8. Rounds half to even.
pub fn pack_int4(
    kn: &[f32],
    k: usize,
    n: usize,
    block: usize,
    symmetric: bool,
) -> (Vec<u8>, Vec<f32>, Option<Vec<u8>>) {
    let blocks = k.div_ceil(block);
    let zp_bytes = blocks.div_ceil(2);
    let mut q = vec![0u8; n * blocks * block / 2];
    let mut scales = vec![0f32; n * blocks];
    let mut zps = vec![0u8; n * zp_bytes];
    for col in 0..n {
        for b in 0..blocks {
            let rows = b * block..((b + 1) * block).min(k);
            let vals = rows.clone().map(|r| kn[r * n + col]);
            let (lo, hi) = vals
                .clone()
                .fold((0f32, 0f32), |(l, h), v| (l.min(v), h.max(v)));
            let (scale, zp) = if symmetric {
                let m = lo.abs().max(hi.abs());
                (if m > 0.0 { m / 7.0 } else { 1.0 }, 8.0)
            } else {
                let s = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                (s, (-lo / s).round_ties_even().clamp(0.0, 15.0))
            };
            scales[col * blocks + b] = scale;
            let zq = zp as u8;
            zps[col * zp_bytes + b / 2] |= zq << (4 * (b % 2));
            for (j, v) in vals.enumerate() {
                let x = (round_even(v / scale) + zp as i32).clamp(0, 15) as u8;
                let at = (col * blocks + b) * block / 2 + j / 2;
                q[at] |= x << (4 * (j % 2));
            }
            // Padding past K reads as the zero point, i.e. exactly zero.
            for j in rows.len()..block {
                let at = (col * blocks + b) * block / 2 + j / 2;
                q[at] |= zq << (4 * (j % 2));
            }
        }
    }
    (q, scales, (!symmetric).then_some(zps))
}

fn emit_matmul_nbits(rw: &mut Rewrite, l: &Linear, inputs: Vec<String>, opts: &WeightOnlyOptions) {
    let y = &l.output;
    let product = if l.bias.is_some() {
        format!("{y}_unbiased")
    } else {
        y.clone()
    };
    let mut mm = node(
        "MatMulNBits",
        format!("{}_MatMulNBits", l.name),
        std::iter::once(l.input.clone()).chain(inputs).collect(),
        product.clone(),
        vec![
            int_attr("K", l.k as i64),
            int_attr("N", l.n as i64),
            int_attr("bits", 4),
            int_attr("block_size", opts.block_size as i64),
        ],
    );
    mm.domain = Some(MS_DOMAIN.into());
    let mut nodes = vec![mm];
    if let Some(b) = &l.bias {
        nodes.push(node(
            "Add",
            format!("{}_bias", l.name),
            vec![product, b.clone()],
            y.clone(),
            vec![],
        ));
    }
    rw.instead(l.node, nodes);
}

#[cfg(test)]
mod tests {
    use super::pack_int4;

    fn unpack(
        q: &[u8],
        scales: &[f32],
        zps: Option<&[u8]>,
        k: usize,
        n: usize,
        block: usize,
    ) -> Vec<f32> {
        let blocks = k.div_ceil(block);
        let mut out = vec![0.0; k * n];
        for col in 0..n {
            for r in 0..k {
                let (b, j) = (r / block, r % block);
                let byte = q[(col * blocks + b) * block / 2 + j / 2];
                let v = (byte >> (4 * (j % 2))) & 15;
                let zp = zps.map_or(8, |z| {
                    (z[col * blocks.div_ceil(2) + b / 2] >> (4 * (b % 2))) & 15
                });
                out[r * n + col] = (v as f32 - zp as f32) * scales[col * blocks + b];
            }
        }
        out
    }

    #[test]
    fn int4_blocks_round_trip_within_half_a_step_and_padding_is_zero() {
        let (k, n, block) = (40, 3, 16); // K not a multiple of the block: the last block is padded
        let kn: Vec<f32> = (0..k * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for symmetric in [false, true] {
            let (q, s, z) = pack_int4(&kn, k, n, block, symmetric);
            let back = unpack(&q, &s, z.as_deref(), k, n, block);
            for (i, (a, b)) in kn.iter().zip(&back).enumerate() {
                let step = s[(i % n) * k.div_ceil(block) + (i / n) / block];
                assert!((a - b).abs() <= step / 2.0 + 1e-5, "{a} came back as {b}");
            }
        }
    }
}
