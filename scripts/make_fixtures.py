#!/usr/bin/env python3
"""Builds the test fixtures: small real models and datasets, plus what the onnxruntime Python
package computes on them (the reference Shrink must match). Nothing here downloads anything.

Usage: make_fixtures.py OUTDIR
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

OPSET = 17


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def digits_mlp(out, hidden, name, max_iter):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=0)
    clf.fit(X_tr, y_tr)
    onx = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                          options={id(clf): {"zipmap": False}}, target_opset=OPSET)
    path = os.path.join(out, f"{name}.onnx")
    onnx.save(onx, path)
    return path, X_tr, y_tr, X_te, y_te.astype(np.int64)


def cnn(out):
    """A small CNN on 8x8 digit images with random weights: Conv-Relu-MaxPool-Conv-Relu-GAP-Gemm."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b2")
    wf = numpy_helper.from_array(rng.normal(0, 0.5, (10, 16)).astype(np.float32), "wf")
    bf = numpy_helper.from_array(np.zeros(10, np.float32), "bf")
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [w1, b1, w2, b2, wf, bf])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shrink-fixtures")
    onnx.checker.check_model(model)
    path = os.path.join(out, "digits_cnn.onnx")
    onnx.save(model, path)
    return path


def im2col(x):
    """x [B,H,W,C] -> [B,H,W,9C] for a 3x3 kernel, padding 1, ordered (kh, kw, c)."""
    B, H, W, C = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.concatenate([xp[:, i:i + H, j:j + W, :] for i in range(3) for j in range(3)], axis=3)

def col2im(dcols, C):
    B, H, W, _ = dcols.shape
    dxp = np.zeros((B, H + 2, W + 2, C), dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, i:i + H, j:j + W, :] += dcols[..., k * C:(k + 1) * C]
    return dxp[:, 1:-1, 1:-1, :]

def train_digits_cnn(X_tr, y_tr, widths=(64, 128, 128), epochs=20, seed=0):
    rng = np.random.default_rng(seed)
    c1, c2, c3 = widths
    def he(fan_in, shape):
        return (rng.normal(0, np.sqrt(2.0 / fan_in), shape)).astype(np.float32)
    P = {"w1": he(9, (9, c1)), "b1": np.zeros(c1, np.float32),
         "w2": he(9 * c1, (9 * c1, c2)), "b2": np.zeros(c2, np.float32),
         "w3": he(9 * c2, (9 * c2, c3)), "b3": np.zeros(c3, np.float32),
         "wf": he(c3, (c3, 10)), "bf": np.zeros(10, np.float32)}
    m = {k: np.zeros_like(v) for k, v in P.items()}
    v = {k: np.zeros_like(v) for k, v in P.items()}
    X = X_tr.reshape(-1, 8, 8, 1).astype(np.float32)
    n, step, lr = len(X), 0, 3e-3
    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, 64):
            idx = order[s:s + 64]
            x, y = X[idx], y_tr[idx]
            B = len(idx)
            col1 = im2col(x); z1 = col1 @ P["w1"] + P["b1"]; a1 = np.maximum(z1, 0)
            col2 = im2col(a1); z2 = col2 @ P["w2"] + P["b2"]; a2 = np.maximum(z2, 0)
            p = a2.reshape(B, 4, 2, 4, 2, c2).max(axis=(2, 4))
            col3 = im2col(p); z3 = col3 @ P["w3"] + P["b3"]; a3 = np.maximum(z3, 0)
            g = a3.mean(axis=(1, 2))
            logits = g @ P["wf"] + P["bf"]
            e = np.exp(logits - logits.max(1, keepdims=True)); prob = e / e.sum(1, keepdims=True)
            d = prob; d[np.arange(B), y] -= 1; d /= B
            G = {"wf": g.T @ d, "bf": d.sum(0)}
            dg = d @ P["wf"].T
            da3 = np.broadcast_to(dg[:, None, None, :] / 16.0, a3.shape)
            dz3 = da3 * (z3 > 0)
            G["w3"] = col3.reshape(-1, col3.shape[-1]).T @ dz3.reshape(-1, c3); G["b3"] = dz3.sum((0, 1, 2))
            dp = col2im(dz3 @ P["w3"].T, c2)
            up = np.repeat(np.repeat(p, 2, axis=1), 2, axis=2)
            mask = (a2 == up)
            da2 = np.repeat(np.repeat(dp, 2, axis=1), 2, axis=2) * mask
            dz2 = da2 * (z2 > 0)
            G["w2"] = col2.reshape(-1, col2.shape[-1]).T @ dz2.reshape(-1, c2); G["b2"] = dz2.sum((0, 1, 2))
            da1 = col2im(dz2 @ P["w2"].T, c1)
            dz1 = da1 * (z1 > 0)
            G["w1"] = col1.reshape(-1, 9).T @ dz1.reshape(-1, c1); G["b1"] = dz1.sum((0, 1, 2))
            step += 1
            rate = lr * 0.5 * (1 + np.cos(np.pi * step / (epochs * ((n + 63) // 64))))
            for k in P:
                m[k] = 0.9 * m[k] + 0.1 * G[k]; v[k] = 0.999 * v[k] + 0.001 * G[k] ** 2
                mh = m[k] / (1 - 0.9 ** step); vh = v[k] / (1 - 0.999 ** step)
                P[k] -= (rate * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return P


def trained_cnn(out, X_tr, y_tr):
    """A digits CNN trained here (numpy, seeded): Conv(1->64)-BatchNorm-Relu-Conv(64->128)-Relu-MaxPool-
    Conv(128->128)-Relu-GAP-Gemm, 99% top-1. Over-parameterised as real CNNs are: half its channels,
    trained from scratch, still reach 99%, and removing them shows in ONNX Runtime's latency; the
    BatchNormalization carries distinct per-channel values (its net effect is folded
    into conv1) so that a pruner slicing it out of step with the convolution changes the outputs."""
    P = train_digits_cnn(X_tr, y_tr)
    c1 = P["w1"].shape[1]
    rng = np.random.default_rng(5)
    s = rng.uniform(0.5, 2.0, c1).astype(np.float32)
    # Running statistics are the real ones of conv1's (rescaled) outputs on the training images,
    # as a network trained with BatchNormalization has: training-mode batch statistics agree.
    z1 = (im2col(X_tr.reshape(-1, 8, 8, 1)) @ P["w1"] + P["b1"]) / s
    mean = z1.mean(axis=(0, 1, 2)).astype(np.float32)
    var = z1.var(axis=(0, 1, 2)).astype(np.float32)
    eps = 1e-5
    gamma = (np.sqrt(var + eps) * s).astype(np.float32)
    beta = (mean * s).astype(np.float32)

    def conv_w(wm):
        c = wm.shape[0] // 9
        return np.ascontiguousarray(wm.reshape(3, 3, c, -1).transpose(3, 2, 0, 1)).astype(np.float32)
    inits = {"w1": conv_w(P["w1"] / s), "b1": P["b1"] / s, "bn_scale": gamma, "bn_bias": beta, "bn_mean": mean,
             "bn_var": var, "w2": conv_w(P["w2"]), "b2": P["b2"], "w3": conv_w(P["w3"]), "b3": P["b3"],
             "wf": np.ascontiguousarray(P["wf"].T), "bf": P["bf"]}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"],
                         name="bn1", epsilon=eps),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn_trained",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shrink-fixtures")
    onnx.checker.check_model(model)
    path = os.path.join(out, "digits_cnn_trained.onnx")
    onnx.save(model, path)
    return path


def student_mlp(out):
    """An untrained 64-128-10 student for distillation (Glorot-initialised, 9,610 parameters)."""
    rng = np.random.default_rng(5)
    def glorot(fan_in, fan_out):
        return rng.uniform(-1, 1, (fan_in, fan_out)).astype(np.float32) * np.float32(np.sqrt(6 / (fan_in + fan_out)))
    inits = [numpy_helper.from_array(glorot(64, 128), "w1"), numpy_helper.from_array(np.zeros(128, np.float32), "b1"),
             numpy_helper.from_array(glorot(128, 10), "w2"), numpy_helper.from_array(np.zeros(10, np.float32), "b2")]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "digits_student",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shrink-fixtures")
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "digits_student.onnx"))


def train_ops(out):
    """A small CNN through the trainable evaluator's CNN ops (strided and asymmetric-padded,
    depthwise convolutions, BatchNormalization, HardSwish, Clip, overlapping pools with padding,
    squeeze-excite, Concat, strided Slice, LogSoftmax), for parity and gradient tests; with a
    matching random input set."""
    rng = np.random.default_rng(11)
    def t(name, *shape, scale=0.4):
        return numpy_helper.from_array((rng.normal(0, scale, shape)).astype(np.float32), name)
    inits = [t("w1", 8, 4, 3, 3), t("b1", 8, scale=0.1),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"), t("bn_b", 8, scale=0.1),
             t("bn_m", 8, scale=0.1), numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
             t("w2", 8, 1, 3, 3), t("se_w", 8, 8), t("se_b", 8, scale=0.1), t("fc_w", 5, 8), t("fc_b", 5, scale=0.1),
             numpy_helper.from_array(np.array([-1, 8, 1, 1], np.int64), "se_shape"),
             numpy_helper.from_array(np.array([1], np.int64), "s_start"), numpy_helper.from_array(np.array([16], np.int64), "s_end"),
             numpy_helper.from_array(np.array([1], np.int64), "s_axis"), numpy_helper.from_array(np.array([2], np.int64), "s_step"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"]),
        helper.make_node("HardSwish", ["n1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], pads=[1, 0, 1, 2], group=8),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["k2"]),
        helper.make_node("MaxPool", ["k2"], ["p2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["p2"], ["a2"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["gf"]),
        helper.make_node("Gemm", ["gf", "se_w", "se_b"], ["se"]),
        helper.make_node("Sigmoid", ["se"], ["ses"]),
        helper.make_node("Reshape", ["ses", "se_shape"], ["ser"]),
        helper.make_node("Mul", ["a2", "ser"], ["excited"]),
        helper.make_node("HardSigmoid", ["excited"], ["hs"]),
        helper.make_node("Concat", ["excited", "hs"], ["cat"], axis=1),
        helper.make_node("Slice", ["cat", "s_start", "s_end", "s_axis", "s_step"], ["sl"]),
        helper.make_node("GlobalMaxPool", ["sl"], ["gm"]),
        helper.make_node("Flatten", ["gm"], ["gmf"]),
        helper.make_node("Tanh", ["gmf"], ["th"]),
        helper.make_node("Gemm", ["th", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("LogSoftmax", ["fc"], ["scores"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "train_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 9, 9])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shrink-fixtures")
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "train_ops.onnx"))
    np.savez(os.path.join(out, "train_ops.npz"), x=rng.normal(0, 1, (8, 4, 9, 9)).astype(np.float32))
    session(os.path.join(out, "train_ops.onnx")).run(None, {"x": np.zeros((1, 4, 9, 9), np.float32)})


def two_input(out):
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["scores"])]
    graph = helper.make_graph(
        nodes, "two_input",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path = os.path.join(out, "two_input.onnx")
    onnx.save(model, path)
    return path


def tanh_chain(out, name, layers, width, gain, seed):
    """`layers` MatMul(width x width, weights ~ N(0, gain^2 / width)) -> Tanh layers, and 128 rows."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.normal(0, 1, (width, width)) * (gain / np.sqrt(width))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}"))
        x = f"t{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.save(model, os.path.join(out, f"{name}.onnx"))
    np.savez(os.path.join(out, f"{name}.npz"), x=rng.normal(0, 1, (128, width)).astype(np.float32))


def outlier_mlp(src, out):
    """The digits MLP with one hidden unit scaled x1000 on the way in and /1000 on the way out:
    the same function (ReLU is positively homogeneous), but one activation outlier that ruins a
    per-tensor int8 scale for every other unit of that layer."""
    m = onnx.load(src)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    mats = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    w1 = numpy_helper.to_array(inits[mats[0].input[1]]).copy()
    add = next(n for n in g.node if n.op_type == "Add" and mats[0].output[0] in n.input)
    bname = next(i for i in add.input if i in inits)
    b1 = numpy_helper.to_array(inits[bname]).copy()
    w2 = numpy_helper.to_array(inits[mats[1].input[1]]).copy()
    unit = int(np.argmax(np.abs(w2).sum(axis=1)))
    w1[:, unit] *= 1000.0
    b1[..., unit] *= 1000.0
    w2[unit, :] /= 1000.0
    for name, arr in ((mats[0].input[1], w1), (bname, b1), (mats[1].input[1], w2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    path = os.path.join(out, "digits_mlp_outlier.onnx")
    onnx.save(m, path)
    return path


def coarse_mlp(out):
    """A 64-16-10 digits MLP whose first-layer weights int8 cannot hold finely: the rows of the
    three pixels that are zero in every digits image (0, 32, 39) get weights 40x the largest of
    their column. The function is unchanged on any digit, but each column's int8 scale is 40x
    coarser, so static PTQ loses points that quantization-aware training can win back."""
    path, *_ = digits_mlp(out, (16,), "digits_mlp_coarse", 300)
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits["coefficient"]).copy()
    top = np.abs(w).max(axis=0)
    rng = np.random.default_rng(0)
    for row in (0, 32, 39):
        w[row, :] = 40.0 * top * rng.choice([-1.0, 1.0], w.shape[1])
    inits["coefficient"].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "coefficient"))
    onnx.save(m, path)
    return path


def constant_weights(out):
    """two_input with its weight in a Constant node instead of an initializer."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("MatMul", ["s", "w"], ["scores"])]
    graph = helper.make_graph(
        nodes, "two_input_constant",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.save(model, os.path.join(out, "two_input_constant.onnx"))


def opset11(out):
    """Operators whose signature changed between opsets 11 and 13 (Split, Squeeze, Unsqueeze,
    ReduceSum attributes; Softmax's 2-D coercion on a rank-3 input)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 1, (4, 6)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Unsqueeze", ["h"], ["u"], axes=[1]),
        helper.make_node("Split", ["u"], ["a", "b"], axis=2, split=[2, 4]),
        helper.make_node("ReduceSum", ["b"], ["total"], axes=[2], keepdims=1),
        helper.make_node("Squeeze", ["a"], ["pair"], axes=[1]),
        helper.make_node("Softmax", ["u"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "opset11", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 1, 6]),
         helper.make_tensor_value_info("pair", TensorProto.FLOAT, ["n", 2]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["n", 1, 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "opset11.onnx"))
    np.savez(os.path.join(out, "opset11.npz"), x=rng.normal(size=(30, 4)).astype(np.float32))


def reference(path, feeds, labels, classifier):
    """What onnxruntime-Python computes: every output, and task metrics on the classifier output."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    ref = {"outputs": names}
    if labels is not None:
        scores = outs[classifier]
        pred = scores.argmax(axis=1)
        top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        ref.update(top1=float((pred == labels).mean()),
                   top5=float(np.mean([l in t for l, t in zip(labels, top5)])),
                   macro_f1=float(f1_score(labels, pred, average="macro")))
    return ref, {k: v.astype(np.float32) for k, v in outs.items()}


def main(out):
    import warnings
    warnings.filterwarnings("ignore")
    os.makedirs(out, exist_ok=True)
    refs = {}

    path, X_tr, y_tr, X_te, y_te = digits_mlp(out, (256, 128), "digits_mlp", 300)
    np.savez(os.path.join(out, "digits_val.npz"), input=X_te, labels=y_te)
    np.savez(os.path.join(out, "digits_val_alias.npz"), x=X_te, y=y_te)
    np.savez(os.path.join(out, "digits_unlabelled.npz"), input=X_te)
    np.savez(os.path.join(out, "digits_train.npz"), input=X_tr, labels=y_tr.astype(np.int64))
    np.savez(os.path.join(out, "digits_train_unlabelled.npz"), input=X_tr)
    from safetensors.numpy import save_file
    save_file({"input": X_te, "labels": y_te}, os.path.join(out, "digits_val.safetensors"))
    refs["digits_mlp"], outs = reference(path, {"input": X_te}, y_te, "probabilities")
    refs["digits_mlp"]["opset"] = next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))
    np.savez(os.path.join(out, "digits_mlp_expected.npz"), **outs)

    # A slower model for cancellation and crash tests (random weights, 64-1024-1024-10).
    big, *_ = digits_mlp(out, (1024, 1024), "digits_mlp_big", 3)

    coarse_mlp(out)
    outlier = outlier_mlp(path, out)
    refs["digits_mlp_outlier"], _ = reference(outlier, {"input": X_te}, y_te, "probabilities")
    constant_weights(out)
    opset11(out)
    student_mlp(out)
    train_ops(out)
    # A real transformer, cut to its first encoder layer (scripts/make_minilm.py).
    import subprocess
    subprocess.run([sys.executable, "-W", "ignore", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_minilm.py"),
                    os.path.join(out, "minilm1"), "1"], check=True, stdout=subprocess.DEVNULL)
    # The whole six-layer model, for depth students (3 of 6 layers) distilled in tests.
    subprocess.run([sys.executable, "-W", "ignore", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_minilm.py"),
                    os.path.join(out, "minilm6"), "6"], check=True, stdout=subprocess.DEVNULL)

    cnn_path = cnn(out)
    images = X_te.reshape(-1, 1, 8, 8)
    np.savez(os.path.join(out, "digits_images.npz"), image=images, labels=y_te)
    refs["digits_cnn"], outs = reference(cnn_path, {"image": images}, y_te, "logits")
    np.savez(os.path.join(out, "digits_cnn_expected.npz"), **outs)
    np.savez(os.path.join(out, "digits_images_train.npz"), image=X_tr.reshape(-1, 1, 8, 8), labels=y_tr.astype(np.int64))
    # What teams have: a few labelled rows and more without labels.
    np.savez(os.path.join(out, "digits_images_few.npz"), image=X_tr[:60].reshape(-1, 1, 8, 8),
             labels=y_tr[:60].astype(np.int64))
    np.savez(os.path.join(out, "digits_images_unlabelled.npz"), image=X_tr[60:660].reshape(-1, 1, 8, 8))
    trained = trained_cnn(out, X_tr, y_tr)
    refs["digits_cnn_trained"], _ = reference(trained, {"image": images}, y_te, "logits")

    # 24 tiny layers: int8 adds a QuantizeLinear before every 4x4 MatMul, which costs more than the
    # float product, so ONNX Runtime runs the int8 model slower (its own static model ~3x).
    tanh_chain(out, "tanh_chain", layers=24, width=4, gain=1.0, seed=3)
    # 100 chaotic layers: int8 rounding changes most rows' argmax (ORT's own static int8 model
    # agrees on ~40% of them), so no accuracy budget of 0 can be met by quantizing it.
    tanh_chain(out, "chaotic_chain", layers=100, width=8, gain=3.0, seed=7)
    ti = two_input(out)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    np.savez(os.path.join(out, "two_input.npz"), a=a, b=b)
    refs["two_input"], outs = reference(ti, {"a": a, "b": b}, None, "scores")
    np.savez(os.path.join(out, "two_input_expected.npz"), **outs)

    # Malformed datasets for the digits MLP, each with one specific fault.
    bad = os.path.join(out, "bad")
    os.makedirs(bad, exist_ok=True)
    np.savez(os.path.join(bad, "sample_mismatch.npz"), input=X_te, labels=y_te[:-1])
    np.savez(os.path.join(bad, "wrong_dtype.npz"), input=X_te.astype(np.float64), labels=y_te)
    np.savez(os.path.join(bad, "wrong_name.npz"), pixels=X_te, labels=y_te)
    np.savez(os.path.join(bad, "wrong_width.npz"), input=X_te[:, :32], labels=y_te)
    np.savez(os.path.join(bad, "wrong_rank.npz"), input=X_te.reshape(-1, 8, 8), labels=y_te)
    np.savez(os.path.join(bad, "float_labels.npz"), input=X_te, labels=y_te.astype(np.float32))
    np.savez(os.path.join(bad, "scalar.npz"), input=X_te, labels=np.int64(3))
    with open(os.path.join(bad, "not_a_dataset.npz"), "wb") as f:
        f.write(b"this is not a dataset at all")
    # Parses as ONNX, but no runtime implements the operator: it can only fail when run.
    unknown = helper.make_model(
        helper.make_graph([helper.make_node("Frobnicate", ["a"], ["scores"], domain="com.example")], "unknown_op",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 4])]),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)])
    onnx.save(unknown, os.path.join(bad, "unknown_op.onnx"))
    ext = onnx.load(ti)
    onnx.save(ext, os.path.join(bad, "external_data.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="external_data.bin", size_threshold=0)
    data = open(path, "rb").read()
    with open(os.path.join(bad, "truncated.onnx"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(bad, "garbage.onnx"), "wb") as f:
        f.write(os.urandom(4096))

    import dense_fixtures
    refs.update(dense_fixtures.segmentation(out))
    refs.update(dense_fixtures.sequences(out))
    dense_fixtures.train_dense_ops(out)
    dense_fixtures.unet(out)

    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(refs, f, indent=2, sort_keys=True)
    print(json.dumps(refs, indent=2, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures-out")
