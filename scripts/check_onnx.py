#!/usr/bin/env python3
"""Runs an ONNX model in the onnxruntime Python package on an .npz dataset and prints JSON:
the output names, the op types in the graph and in the graph ONNX Runtime actually runs after its
optimizations (which shows whether QDQ chains became integer kernels), and top-1 accuracy of OUTPUT
against `labels` (null without labels), and the predictions. Runs in batches of 32, like Shrink's evaluator.

Usage: check_onnx.py MODEL.onnx DATA.npz OUTPUT
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main(model_path, data_path, output):
    import tempfile
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    optimized = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False).name
    opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    data = np.load(data_path)
    # Batches of 32, as Shrink's evaluator runs: dynamic quantization computes activation scales
    # per batch, so results depend on how samples are grouped.
    names = [i.name for i in sess.get_inputs()]
    rows = len(data[names[0]])
    parts = [sess.run(None, {n: data[n][s:s + 32] for n in names}) for s in range(0, rows, 32)]
    outs = {o.name: np.concatenate([p[k] for p in parts]) for k, o in enumerate(sess.get_outputs())}
    pred = outs[output].argmax(axis=1)
    ops = sorted({n.op_type for n in onnx.load(model_path).graph.node})
    runs = [n.op_type for n in onnx.load(optimized).graph.node]
    top1 = float((pred == data["labels"]).mean()) if "labels" in data else None
    print(json.dumps({"outputs": list(outs), "ops": ops, "optimized_ops": runs, "top1": top1,
                      "input_types": [i.type for i in sess.get_inputs()],
                      "output_types": [o.type for o in sess.get_outputs()],
                      "predictions": pred.tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
