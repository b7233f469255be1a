"""Fixtures with dense and sequence outputs (imported by make_fixtures.py):

- seg.onnx: a small U-Net-shaped segmenter (conv, max-pool, conv, nearest Resize x2, Concat skip,
  1x1 head) over rendered scenes of red discs (class 1) and blue rectangles (class 2) on noisy
  backgrounds; [n, 3, h, w] -> logits [n, 3, h, w] with dynamic, non-square spatial sizes. The
  convolutions are random; the head is fitted by least squares, so the masks are good, not perfect.
- seg_binary.onnx: the same backbone with a sigmoid foreground map [n, 1, h, w].
- tagger.onnx: a per-position classifier [n, 12, 6] -> [n, 12, 5]; labels padded with -100.
- ctc.onnx: a CTC "recogniser" [n, 16, 8] -> softmax [n, 16, 6] whose metadata lists its
  characters (`character`, one per line, as PaddleOCR writes it); labels are strings.
- ctc_time_major.onnx, ctc_time_major_b1.onnx: the same recogniser exporting time-major
  [16, n, 6] as recurrent CTC models do (PyTorch's `CTCLoss` layout), with a dynamic batch and
  with the batch fixed to 1; they must score exactly as ctc.onnx does.

Each model comes with what numpy computes from onnxruntime's outputs (the numbers Shrink must match).
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IGNORE = 255


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def scenes(n, h, w, seed):
    """Images [n, 3, h, w] in [0, 1] and labels [n, h, w]: 0 background, 1 disc, 2 rectangle,
    255 on the one-pixel rim of every shape (ambiguous pixels, ignored as in Pascal VOC)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, 3, h, w), np.float32)
    labels = np.zeros((n, h, w), np.int64)
    for i in range(n):
        bg = rng.uniform(0.3, 0.6, 3)
        img = bg[:, None, None] + rng.normal(0, 0.06, (3, h, w))
        lab = np.zeros((h, w), np.int64)
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 8)
                mask, cls, colour = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, 1, (0.9, 0.25, 0.2)
            else:
                y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
                mask = (yy >= y0) & (yy < y0 + rng.integers(5, 14)) & (xx >= x0) & (xx < x0 + rng.integers(5, 18))
                cls, colour = 2, (0.2, 0.3, 0.9)
            tint = np.array(colour) + rng.normal(0, 0.05, 3)
            img[:, mask] = tint[:, None] + rng.normal(0, 0.06, (3, int(mask.sum())))
            lab[mask] = cls
        rim = np.zeros((h, w), bool)
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rim |= lab != np.roll(np.roll(lab, dy, 0), dx, 1)
        lab[rim] = IGNORE
        images[i], labels[i] = np.clip(img, 0, 1), lab
    return images, labels


def _conv(x, w, b):
    """3x3 (pad 1) or 1x1 convolution in numpy, NCHW."""
    k = w.shape[-1]
    if k == 1:
        return np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0]) + b[None, :, None, None]
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, c, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", p[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]


def _features(x, w1, b1, w2, b2):
    f1 = np.maximum(_conv(x, w1, b1), 0)
    n, c, h, w = f1.shape
    pooled = f1.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    f2 = np.maximum(_conv(pooled, w2, b2), 0)
    up = f2.repeat(2, axis=2).repeat(2, axis=3)
    return np.concatenate([f1, up], axis=1)


def _segmenter(path, w1, b1, w2, b2, head_w, head_b, sigmoid):
    init = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
            ((w1, "enc1.weight"), (b1, "enc1.bias"), (w2, "enc2.weight"), (b2, "enc2.bias"),
             (head_w, "head.weight"), (head_b, "head.bias"))]
    init.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up.scales"))
    nodes = [
        helper.make_node("Conv", ["image", "enc1.weight", "enc1.bias"], ["c1"], name="enc1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["f1"], name="relu1"),
        helper.make_node("MaxPool", ["f1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "enc2.weight", "enc2.bias"], ["c2"], name="enc2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["f2"], name="relu2"),
        helper.make_node("Resize", ["f2", "", "up.scales"], ["u2"], name="up", mode="nearest"),
        helper.make_node("Concat", ["f1", "u2"], ["cat"], name="skip", axis=1),
        helper.make_node("Conv", ["cat", "head.weight", "head.bias"], ["head_out" if sigmoid else "logits"], name="head"),
    ]
    out_name, channels = ("logits", 3)
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["head_out"], ["prob"], name="sigmoid"))
        out_name, channels = ("prob", 1)
    graph = helper.make_graph(
        nodes, "unet_tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["n", channels, "h", "w"])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def confusion_metrics(pred, labels, k):
    """Pixel accuracy, mean IoU / Dice over classes in labels or predictions, per class."""
    keep = (labels >= 0) & (labels != IGNORE)
    p, t = pred[keep].astype(np.int64), labels[keep]
    conf = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(conf)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    present = tp + fp + fn > 0
    iou = np.where(present, tp / np.maximum(tp + fp + fn, 1), np.nan)
    dice = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
    return dict(pixels=int(keep.sum()), pixel_accuracy=float(tp.sum() / keep.sum()),
                mean_iou=float(np.nanmean(iou)), mean_dice=float(np.nanmean(dice)),
                per_class_iou=as_list(iou), per_class_dice=as_list(dice))


def segmentation(out):
    h, w = 40, 56
    x_tr, y_tr = scenes(160, h, w, seed=11)
    x_va, y_va = scenes(48, h, w, seed=12)
    np.savez(os.path.join(out, "seg_train.npz"), image=x_tr, labels=y_tr)
    np.savez(os.path.join(out, "seg_val.npz"), image=x_va, labels=y_va)
    # Smaller scenes for the training pipeline tests (a U-Net trains on them in CI).
    for name, n, seed in (("scenes_train", 96, 13), ("scenes_val", 48, 14)):
        x, y = scenes(n, 24, 32, seed=seed)
        np.savez(os.path.join(out, f"{name}.npz"), image=x, labels=y)
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.6, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.3, 8).astype(np.float32)
    w2 = rng.normal(0, 0.25, (8, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    feats = _features(x_tr, w1, b1, w2, b2)
    f = feats.transpose(0, 2, 3, 1).reshape(-1, feats.shape[1])
    f = np.concatenate([f, np.ones((len(f), 1), np.float32)], 1)
    t = y_tr.reshape(-1)
    keep = t != IGNORE
    fk = f[keep].astype(np.float64)
    ridge = lambda target: np.linalg.solve(fk.T @ fk + 1e-2 * np.eye(f.shape[1]), fk.T @ target)  # noqa: E731
    coef = ridge(np.eye(3)[t[keep]] * 8 - 4)
    _segmenter(os.path.join(out, "seg.onnx"), w1, b1, w2, b2,
               coef[:-1].T.reshape(3, -1, 1, 1), coef[-1], sigmoid=False)
    coef_b = ridge(np.where(t[keep] > 0, 4.0, -4.0))
    _segmenter(os.path.join(out, "seg_binary.onnx"), w1, b1, w2, b2,
               coef_b[:-1].reshape(1, -1, 1, 1), np.array([coef_b[-1]]), sigmoid=True)

    refs = {}
    logits = _session(os.path.join(out, "seg.onnx")).run(None, {"image": x_va})[0]
    refs["seg"] = confusion_metrics(logits.argmax(axis=1), y_va, 3)
    prob = _session(os.path.join(out, "seg_binary.onnx")).run(None, {"image": x_va})[0]
    binary = np.where(y_va == IGNORE, IGNORE, (y_va > 0).astype(np.int64))
    np.savez(os.path.join(out, "seg_binary_val.npz"), image=x_va, labels=binary)
    refs["seg_binary"] = confusion_metrics((prob[:, 0] >= 0.5).astype(np.int64), binary, 2)
    # Masks one model makes against the other's: what "mask IoU with the baseline" means.
    refs["seg_binary"]["threshold"] = 0.5
    return refs


def _sequence_model(path, weight, bias, inp, out_name, softmax, characters=None, time_major=False, batch="n"):
    last = "z" if softmax else out_name
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "b"], [last], name="bias")]
    if softmax:
        last = "p" if time_major else out_name
        nodes.append(helper.make_node("Softmax", ["z"], [last], name="softmax", axis=-1))
    out_shape = [batch, inp[0], weight.shape[1]]
    if time_major:
        nodes.append(helper.make_node("Transpose", [last], [out_name], name="time_major", perm=[1, 0, 2]))
        out_shape = [inp[0], batch, weight.shape[1]]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inp[0], inp[1]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    if characters is not None:
        helper.set_model_props(model, {"character": "\n".join(characters)})
    onnx.save(model, path)


def ctc_decode(probs, blank=0):
    out = []
    for seq in probs.argmax(axis=-1):
        keep = [k for i, k in enumerate(seq) if k != blank and (i == 0 or k != seq[i - 1])]
        out.append(keep)
    return out


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a):
        diag, row[0] = row[0], i + 1
        for j, y in enumerate(b):
            up = row[j + 1]
            row[j + 1] = diag if x == y else 1 + min(diag, up, row[j])
            diag = up
    return row[len(b)]


def sequences(out):
    rng = np.random.default_rng(21)
    refs = {}
    # Tagger: the labels are the true projection's arg-max, the model a perturbed copy of it.
    n, t, d, c = 64, 12, 6, 5
    x = rng.normal(size=(n, t, d)).astype(np.float32)
    w_true = rng.normal(size=(d, c)).astype(np.float32)
    labels = (x @ w_true).argmax(-1).astype(np.int64)
    lengths = rng.integers(4, t + 1, n)
    labels[np.arange(t)[None, :] >= lengths[:, None]] = -100
    w = (w_true + rng.normal(0, 0.6, w_true.shape)).astype(np.float32)
    _sequence_model(os.path.join(out, "tagger.onnx"), w, np.zeros(c, np.float32), (t, d), "tags", softmax=False)
    np.savez(os.path.join(out, "tagger_val.npz"), x=x, labels=labels)
    tags = _session(os.path.join(out, "tagger.onnx")).run(None, {"x": x})[0]
    keep = labels >= 0
    refs["tagger"] = dict(positions=int(keep.sum()),
                          position_accuracy=float((tags.argmax(-1)[keep] == labels[keep]).mean()))
    # CTC: 16 steps over blank + 5 characters; labels are what the true weights decode to, so the
    # perturbed model gets most lines, not all, right.
    n, t, d, chars = 48, 16, 8, ["a", "b", "c", "d", "e"]
    x = rng.normal(size=(n, t, d)).astype(np.float32)
    w_true = rng.normal(size=(d, len(chars) + 1)).astype(np.float32) * 2
    truth = ["".join(chars[k - 1] for k in s) for s in ctc_decode(x @ w_true)]
    w = (w_true + rng.normal(0, 0.25, w_true.shape)).astype(np.float32)
    _sequence_model(os.path.join(out, "ctc.onnx"), w, np.zeros(len(chars) + 1, np.float32), (t, d), "probs",
                    softmax=True, characters=chars)
    np.savez(os.path.join(out, "ctc_val.npz"), x=x, labels=np.array(truth))
    for name, batch in (("ctc_time_major.onnx", "n"), ("ctc_time_major_b1.onnx", 1)):
        _sequence_model(os.path.join(out, name), w, np.zeros(len(chars) + 1, np.float32), (t, d), "probs",
                        softmax=True, characters=chars, time_major=True, batch=batch)
        first = _session(os.path.join(out, name)).run(None, {"x": x[:1]})[0]
        assert first.shape == (t, 1, len(chars) + 1), first.shape
    probs = _session(os.path.join(out, "ctc.onnx")).run(None, {"x": x})[0]
    decoded = ["".join(chars[k - 1] for k in s) for s in ctc_decode(probs)]
    edits = sum(levenshtein(p, l) for p, l in zip(decoded, truth))
    refs["ctc"] = dict(sequence_accuracy=float(np.mean([p == l for p, l in zip(decoded, truth)])),
                       character_error_rate=float(edits / sum(len(l) for l in truth)))
    return refs


def train_dense_ops(out):
    """Decoder ops for training parity and gradient tests: ConvTranspose (stride 2, asymmetric
    pads, output_padding), Resize (linear half_pixel to other sizes, nearest asymmetric/floor,
    linear align_corners, nearest pytorch_half_pixel/round_prefer_ceil at a non-integer scale),
    Concat skips and Sigmoid; a fixed batch of 8 on 6x7 inputs. Also an opset-9 Upsample."""
    rng = np.random.default_rng(17)
    t = lambda name, *shape, s=0.4: numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name)  # noqa: E731
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    floats = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [t("w1", 6, 4, 3, 3), t("b1", 6, s=0.1), t("wt", 6, 5, 3, 3), t("bt", 5, s=0.1), t("wh", 3, 29, 1, 1),
             t("bh", 3, s=0.1), ints("size_t", [8, 5, 6, 7]), ints("size_p", [8, 6, 6, 7]),
             floats("scale_p", [1, 1, 2, 2.5])]
    R = lambda src, dst, **kw: helper.make_node("Resize", src, [dst], name=dst, **kw)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="enc", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "wt", "bt"], ["t"], name="deconv", strides=[2, 2],
                         pads=[1, 1, 0, 1], output_padding=[1, 0]),
        R(["t", "", "", "size_t"], "u", mode="linear"),
        R(["p", "", "", "size_p"], "v", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        R(["p", "", "", "size_p"], "w", mode="linear", coordinate_transformation_mode="align_corners"),
        R(["p", "", "scale_p"], "z", mode="nearest", coordinate_transformation_mode="pytorch_half_pixel",
          nearest_mode="round_prefer_ceil"),
        helper.make_node("Concat", ["r1", "u", "v", "w", "z"], ["cat"], name="skip", axis=1),
        helper.make_node("Conv", ["cat", "wh", "bh"], ["h"], name="head"),
        helper.make_node("Sigmoid", ["h"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(nodes, "dense_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4, 6, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3, 6, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "dense_ops.onnx"))
    np.savez(os.path.join(out, "dense_ops.npz"), x=rng.normal(0, 1, (8, 4, 6, 7)).astype(np.float32))
    _session(os.path.join(out, "dense_ops.onnx")).run(None, {"x": np.zeros((8, 4, 6, 7), np.float32)})

    inits = [floats("scales", [1, 1, 2, 3]), t("wc", 2, 3, 1, 1)]
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "wc"], ["y"])]
    graph = helper.make_graph(nodes, "upsample9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 2, 8, 15])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "upsample9.onnx"))
    np.savez(os.path.join(out, "upsample9.npz"), x=rng.normal(0, 1, (8, 3, 4, 5)).astype(np.float32))

    # Strides that differ per axis, as text recognisers halve the height alone: a depthwise 2x1,
    # a 1x2 with 5x5 kernels, a 3x2 with padding on one axis; and a strided 1-D convolution.
    inits = [t("wd", 4, 1, 3, 3), t("bd", 4, s=0.1), t("wp", 6, 4, 5, 5, s=0.2), t("wq", 5, 6, 3, 3, s=0.2)]
    nodes = [helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="dw21", group=4, strides=[2, 1], pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["d"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "wp"], ["e"], name="conv12", strides=[1, 2], pads=[2, 2, 2, 2]),
             helper.make_node("Conv", ["e", "wq"], ["y"], name="conv32", strides=[3, 2], pads=[1, 0, 1, 0])]
    graph = helper.make_graph(nodes, "strided", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 5, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "strided_ops.onnx"))
    np.savez(os.path.join(out, "strided_ops.npz"), x=rng.normal(0, 1, (8, 4, 9, 10)).astype(np.float32))
    y = _session(os.path.join(out, "strided_ops.onnx")).run(None, {"x": np.zeros((8, 4, 9, 10), np.float32)})[0]
    assert y.shape == (8, 5, 2, 2), y.shape

    inits = [t("w1d", 4, 3, 3)]
    nodes = [helper.make_node("Conv", ["x", "w1d"], ["y"], name="conv1d", strides=[2], pads=[1, 1])]
    graph = helper.make_graph(nodes, "strided1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "strided1d.onnx"))
    np.savez(os.path.join(out, "strided1d.npz"), x=rng.normal(0, 1, (8, 3, 11)).astype(np.float32))


def unet(out, widths=(16, 32, 64), name="unet_teacher"):
    """An untrained U-Net for the rendered scenes (He-initialised; Shrink trains it): two
    3x3 Conv+Relu at full resolution, max-pool, two at 1/2, max-pool, one at 1/4; nearest Resize
    x2 and Concat with the 1/2 features, 3x3 Conv+Relu; ConvTranspose x2 and Concat with the
    full-resolution features, 3x3 Conv+Relu; 1x1 head to 3 classes. [n, 3, h, w] -> logits."""
    rng = np.random.default_rng(31)
    a, b, c = widths
    inits, nodes = [], []

    def conv(src, dst, cin, cout, k=3, relu=True):
        std = np.sqrt(2.0 / (cin * k * k))
        inits.append(numpy_helper.from_array(rng.normal(0, std, (cout, cin, k, k)).astype(np.float32), f"{dst}.weight"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{dst}.bias"))
        nodes.append(helper.make_node("Conv", [src, f"{dst}.weight", f"{dst}.bias"], [dst + "_c" if relu else dst],
                                      name=dst, pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [dst + "_c"], [dst], name=dst + "_relu"))
        return dst

    def pool(src, dst):
        nodes.append(helper.make_node("MaxPool", [src], [dst], name=dst, kernel_shape=[2, 2], strides=[2, 2]))
        return dst

    e1 = conv(conv("image", "enc1a", 3, a), "enc1b", a, a)
    e2 = conv(conv(pool(e1, "pool1"), "enc2a", a, b), "enc2b", b, b)
    m = conv(pool(e2, "pool2"), "mid", b, c)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up2.scales"))
    nodes.append(helper.make_node("Resize", [m, "", "up2.scales"], ["up2"], name="up2", mode="nearest"))
    nodes.append(helper.make_node("Concat", ["up2", e2], ["skip2"], name="skip2", axis=1))
    d2 = conv("skip2", "dec2", c + b, b)
    std = np.sqrt(2.0 / (b * 4))
    inits.append(numpy_helper.from_array(rng.normal(0, std, (b, a, 2, 2)).astype(np.float32), "up1.weight"))
    inits.append(numpy_helper.from_array(np.zeros(a, np.float32), "up1.bias"))
    nodes.append(helper.make_node("ConvTranspose", [d2, "up1.weight", "up1.bias"], ["up1"], name="up1",
                                  kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Concat", ["up1", e1], ["skip1"], name="skip1", axis=1))
    d1 = conv("skip1", "dec1", 2 * a, a)
    conv(d1, "logits", a, 3, k=1, relu=False)
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, f"{name}.onnx"))
