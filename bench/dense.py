#!/usr/bin/env python3
"""Dense and sequence outputs through the service.

First the edge practice pipeline on a segmentation model the project builds and trains itself:
an untrained U-Net (scripts/dense_fixtures.py) trained by a `finetune` job on 160 rendered scenes,
then one job `distill` (width 0.34) -> `prune` (20% of every block's channels) -> `quantize`
(`mode: qat`); the report's mean IoU, size, latency and peak memory after each stage, and the
teacher against the final model timed turn about in onnxruntime-Python.

Then the PaddleOCR models that ship in the `rapidocr-onnxruntime` package (Apache-2.0): the
PP-OCRv4 DB text detector (MobileNetV3 + FPN, a [N, 1, H, W] probability map) and the PP-OCRv4
CTC recogniser ([N, T, 6625]).

For each, a job runs the default quantize stage with a 1-point accuracy budget on rendered,
unlabelled data (scripts/make_ocr_data.py), so the budget reads the task's own agreement with the
float model: mask IoU for the detector, per-position agreement for the recogniser. Beside it,
ONNX Runtime's own `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, the same
calibration samples). Every model is scored in onnxruntime-Python and timed there, turn about in
one process (1 intra-op thread, p50), the recogniser's lines also decoded against their text.

Usage: .venv/bin/python bench/dense.py [SHRINK_BINARY]   (a release build searches faster)
"""
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import dense_fixtures  # noqa: E402
import make_ocr_data  # noqa: E402
from service import Service, shrink_binary  # noqa: E402

SHRINK = shrink_binary(sys.argv)


def session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def outputs(path, x, batch=8):
    s = session(path)
    return np.concatenate([s.run(None, {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def turn_about(paths, x, batch, turns):
    """p50 ms of every model at `batch`, each turn running every model once, order rotating."""
    sessions = [session(p) for p in paths]
    feed = {"x": x[:batch]}
    for s in sessions:
        s.run(None, feed)
    times = [[] for _ in paths]
    for turn in range(turns):
        order = list(range(len(paths)))
        order = order[turn % len(order):] + order[:turn % len(order)]
        for i in order:
            t = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append(1e3 * (time.perf_counter() - t))
    return [float(np.median(t)) for t in times]


def mask_iou(a, b):
    """Mean IoU over {background, foreground} of two thresholded probability maps."""
    a, b = a >= 0.5, b >= 0.5
    ious = []
    for cls in (False, True):
        inter = np.sum((a == cls) & (b == cls))
        union = np.sum((a == cls) | (b == cls))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


class Reader(CalibrationDataReader):
    def __init__(self, x):
        self.rows = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.rows, None)


def ort_static(model, calib, out, **options):
    pre = out + ".pre.onnx"
    m = onnx.load(model)
    if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
        # per-channel QDQ needs opset 13 (DequantizeLinear's axis)
        model = out + ".opset13.onnx"
        onnx.save(onnx.version_converter.convert_version(m, 13), model)
    here = os.getcwd()
    os.chdir(os.path.dirname(out))  # symbolic shape inference writes a temporary model to the cwd
    try:
        quant_pre_process(model, pre)
    except Exception:  # symbolic shape inference gives up on some exports: ONNX's own then
        quant_pre_process(model, pre, skip_symbolic_shape=True)
    finally:
        os.chdir(here)
    quantize_static(pre, out, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **options)
    return out


def decode(probs, chars):
    texts = []
    for seq in probs.argmax(-1):
        keep = [k for i, k in enumerate(seq) if k != 0 and (i == 0 or k != seq[i - 1])]
        texts.append("".join(chars[k - 1] for k in keep))
    return texts


def layers_line(stage):
    layers = stage["layers"]
    int8 = sum(1 for l in layers if l["precision"] == "int8")
    why = {}
    for l in layers:
        if l["precision"] != "int8":
            reason = l["reason"].split(":")[0]
            why[reason] = why.get(reason, 0) + 1
    kept = "; ".join(f"{n} {r}" for r, n in why.items())
    return f"{int8} of {len(layers)} layers int8" + (f" (float: {kept})" if kept else "")


def notes(stage):
    """The stage's notes on the budget, the calibration and the speed of the result."""
    keys = ("accuracy budget", "calibration auto", "layer(s) kept float", "ONNX Runtime p50", "speed search",
            "after the speed search", "no int8 configuration", "no configuration found", "keeping layers float",
            "bias correction", "GPTQ", "weight rounding")
    for n in stage.get("notes", []):
        if any(k in n for k in keys):
            print(f"  note: {n}")
    sens = sorted((l for l in stage["layers"] if l.get("sensitivity") is not None),
                  key=lambda l: -l["sensitivity"])
    if sens:
        print("  most sensitive alone in int8: " + ", ".join(
            f"{l['node']} ({l['op']}) {l['sensitivity']:.4f}" for l in sens[:8]))
    kept = [l["node"] for l in stage["layers"] if l["precision"] == "float" and "accuracy budget" in l["reason"]]
    if kept:
        print("  kept float for the budget: " + ", ".join(kept))


def job(svc, model, data, calib):
    m, d, c = svc.upload("models", model), svc.upload("datasets", data), svc.upload("datasets", calib)
    return svc.job({"model_id": m, "dataset_id": d, "calibration_dataset_id": c,
                    "pipeline": [{"stage": "evaluate", "batch_size": 8},
                                 {"stage": "quantize", "max_accuracy_drop": 0.01}]})


def stage_row(name, m):
    seg = m["task"]["segmentation"]
    lat = m["latency"]
    return (f"  {name:<12} mean IoU {seg['mean_iou']:.4f}  params {m['size']['parameters']:>7}  "
            f"{m['size']['bytes']:>7} B  p50 batch 1 {lat['batch_1']['p50_ms']:6.3f} ms  "
            f"batch {lat['batch_n']['batch_size']} {lat['batch_n']['p50_ms']:7.2f} ms  "
            f"peak memory +{m['memory']['peak_rss_growth_bytes'] / 2**20:.1f} MiB")


def unet(svc, work):
    fx = os.path.join(work, "fx")
    os.makedirs(fx, exist_ok=True)
    dense_fixtures.segmentation(fx)
    dense_fixtures.unet(fx, widths=(32, 64, 128), name="unet_bench")
    print("\n## The practice pipeline: a U-Net (32-64-128 channels) on 160 rendered 40x56 scenes, 48 held out")
    m = svc.upload("models", os.path.join(fx, "unet_bench.onnx"))
    d = svc.upload("datasets", os.path.join(fx, "seg_val.npz"))
    t = svc.upload("datasets", os.path.join(fx, "seg_train.npz"))
    started = time.time()
    jid, rep = svc.job({"model_id": m, "dataset_id": d, "train_dataset_id": t, "seed": 1,
                        "pipeline": [{"stage": "evaluate", "latency_runs": 3},
                                     {"stage": "finetune", "epochs": 20, "learning_rate": 0.005,
                                      "batch_size": 16, "patience": 0}]})
    print(f"  teacher trained by a finetune job in {time.time() - started:.0f} s")
    teacher = svc.artifact(jid, rep["stages"][1]["artifact"], work)
    tm = svc.upload("models", teacher)
    started = time.time()
    jid, rep = svc.job({"model_id": tm, "dataset_id": d, "train_dataset_id": t, "seed": 2,
                        "pipeline": [{"stage": "evaluate"},
                                     {"stage": "distill", "width": 0.34, "epochs": 24, "learning_rate": 0.01,
                                      "batch_size": 16, "patience": 0},
                                     {"stage": "prune", "method": "structured", "sparsity": 0.2,
                                      "finetune": {"epochs": 6, "learning_rate": 0.002, "batch_size": 16,
                                                   "patience": 0}},
                                     {"stage": "quantize", "mode": "qat", "allow_slower": True,
                                      "qat": {"epochs": 4, "learning_rate": 0.0005, "batch_size": 16}}]})
    print(f"  distill -> prune -> qat job took {time.time() - started:.0f} s")
    print(stage_row("teacher", rep["baseline"]))
    for s in rep["stages"][1:]:
        print(stage_row(s["stage"], s["metrics"]))
    base, last = rep["baseline"], rep["stages"][-1]["metrics"]
    final = svc.artifact(jid, rep["stages"][-1]["artifact"], work)
    x = np.load(os.path.join(fx, "seg_val.npz"))["image"]
    feeds = {"image": x}
    sessions = [session(teacher), session(final)]
    for batch in (1, 32):
        times = [[], []]
        for turn in range(40 if batch == 1 else 12):
            for i in ((0, 1) if turn % 2 else (1, 0)):
                f = {"image": feeds["image"][:batch]}
                t0 = time.perf_counter()
                sessions[i].run(None, f)
                times[i].append(1e3 * (time.perf_counter() - t0))
        a, b = float(np.median(times[0])), float(np.median(times[1]))
        print(f"  onnxruntime-Python p50 batch {batch:>2}: teacher {a:.3f} ms, int8 student {b:.3f} ms -> {a / b:.2f}x")
    print(f"  final/teacher mean IoU {last['task']['segmentation']['mean_iou'] / base['task']['segmentation']['mean_iou']:.4f}, "
          f"{base['size']['bytes'] / last['size']['bytes']:.2f}x smaller, "
          f"{base['size']['parameters'] / last['size']['parameters']:.2f}x fewer parameters")
    layers = rep["stages"][2]["pruning"]["layers"]
    print("  pruned: " + ", ".join(f"{l['node']} {l['pattern']}" for l in layers))


def main():
    print(f"# bench/dense.py, {time.strftime('%Y-%m-%d %H:%M')}, onnxruntime {ort.__version__}, "
          f"1 intra-op thread, {SHRINK}")
    only = os.environ.get("BENCH_ONLY")
    rec, det = make_ocr_data.models()
    with tempfile.TemporaryDirectory() as work:
        evald, calibd = os.path.join(work, "eval"), os.path.join(work, "calib")
        if only != "unet":
            make_ocr_data.main(evald, 200, 24, 0)
            make_ocr_data.main(calibd, 64, 16, 1)
        svc = Service(SHRINK, work)
        try:
            if only in (None, "unet"):
                unet(svc, work)
            if only in (None, "det"):
                print("\n## PP-OCRv4 DB text detector (ch_PP-OCRv4_det_infer.onnx), 24 pages 416x608")
                started = time.time()
                jid, rep = job(svc, det, os.path.join(evald, "det_pages.npz"), os.path.join(calibd, "det_pages.npz"))
                stage = rep["stages"][1]
                print(f"  job took {time.time() - started:.0f} s; {layers_line(stage)}")
                notes(stage)
                ours = svc.artifact(jid, stage["artifact"], work) if stage.get("artifact") else det
                x = np.load(os.path.join(evald, "det_pages.npz"))["x"]
                calib = np.load(os.path.join(calibd, "det_pages.npz"))["x"]
                theirs = ort_static(det, calib, os.path.join(work, "det_ort_static.onnx"))
                pct = ort_static(det, calib, os.path.join(work, "det_ort_percentile.onnx"),
                                 calibrate_method=CalibrationMethod.Percentile)
                # The ceiling of int8 on this model: int8 weights with float activations.
                m = svc.upload("models", det)
                wid, wrep = svc.job({"model_id": m, "dataset_id": svc.upload("datasets", os.path.join(evald, "det_pages.npz")),
                                     "pipeline": [{"stage": "quantize", "mode": "weight_only", "allow_slower": True}]})
                weights = svc.artifact(wid, wrep["stages"][0]["artifact"], work)
                ref = outputs(det, x)
                names = ["float32", "ORT quantize_static", "ORT static, percentile", "Shrink weight-only int8",
                         "Shrink quantize"]
                paths = [det, theirs, pct, weights, ours]
                lat8 = turn_about(paths, x, 8, 12)
                lat1 = turn_about(paths, x, 1, 30)
                for name, p, l1, l8 in zip(names, paths, lat1, lat8):
                    iou = mask_iou(ref, outputs(p, x))
                    print(f"  {name:<24} {os.path.getsize(p):>9} B  mask IoU vs float {iou:.4f}  "
                          f"p50 batch 1 {l1:8.1f} ms  batch 8 {l8:8.1f} ms ({lat8[0] / l8:.2f}x float)")
                f = stage["metrics"]["fidelity"][0]
                print(f"  report: mask IoU {f['mask_iou']:.4f}, pixel agreement {f['top1_agreement']:.4f}; "
                      f"stage {stage['duration_ms'] / 1000:.0f} s")
            if only in (None, "rec"):
                print("\n## PP-OCRv4 CTC recogniser (ch_PP-OCRv4_rec_infer.onnx), 200 rendered lines 48x320")
                started = time.time()
                jid, rep = job(svc, rec, os.path.join(evald, "rec_lines_unlabelled.npz"),
                               os.path.join(calibd, "rec_lines_unlabelled.npz"))
                stage = rep["stages"][1]
                print(f"  job took {time.time() - started:.0f} s; {layers_line(stage)}")
                notes(stage)
                ours = svc.artifact(jid, stage["artifact"], work) if stage.get("artifact") else rec
                lines = np.load(os.path.join(evald, "rec_lines.npz"))
                calib = np.load(os.path.join(calibd, "rec_lines.npz"))["x"]
                theirs = ort_static(rec, calib, os.path.join(work, "rec_ort_static.onnx"))
                meta = {p.key: p.value for p in onnx.load(rec).metadata_props}
                chars = meta["character"].split("\n") + [" "]
                ref = outputs(rec, lines["x"])
                paths = [rec, theirs, ours]
                lat8 = turn_about(paths, lines["x"], 8, 20)
                ref_text = decode(ref, chars)
                for name, p, l8 in zip(["float32", "ORT quantize_static", "Shrink quantize"], paths, lat8):
                    o = outputs(p, lines["x"])
                    agree = float(np.mean(o.argmax(-1) == ref.argmax(-1)))
                    text = decode(o, chars)
                    same = float(np.mean([a == b for a, b in zip(text, ref_text)]))
                    # The model reads the padding's edges as spaces; the labels have none there.
                    acc = float(np.mean([a.strip() == b for a, b in zip(text, lines["labels"])]))
                    print(f"  {name:<20} {os.path.getsize(p):>9} B  per-position agreement {agree:.4f}  "
                          f"decoded lines equal to float's {same:.3f}  lines exactly right {acc:.3f}  "
                          f"p50 batch 8 {l8:7.1f} ms ({lat8[0] / l8:.2f}x float)")
                f = stage["metrics"]["fidelity"][0]
                print(f"  report: {f['task']} output, per-position agreement {f['top1_agreement']:.4f}, decoded-sequence "
                      f"agreement {f.get('sequence_agreement', float('nan')):.4f}; stage {stage['duration_ms'] / 1000:.0f} s")
        finally:
            svc.close()


if __name__ == "__main__":
    main()
