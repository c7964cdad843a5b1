"""The digits demo in one place: the real digits as an evaluation set, and the demo's two metrics.

The demo trains DiMR-S/2R on scikit-learn's 1,797 real 8x8 grayscale digits (data.py). Its
class-conditional samples are measured
- by FID against the real digits: fid.py's Inception on both, each 8x8 image resized to 299x299
  like any other (README, "Evaluation");
- by class accuracy: the share of samples that an RBF SVM trained on the real digits
  (scikit-learn's digits example) assigns the class they were conditioned on.

A real digit v in [0, 1] is the image 2 v - 1 in [-1, 1], the training data's scale (data.py),
and becomes uint8 through sample.to_uint8, exactly as the samples do.

    python demo.py fid samples/digits/samples.npz [--ref digits_stats.npz]   FID, class accuracy
    python demo.py ref-batch -o digits_ref.npz       the real digits as an ADM reference batch,
    python fid.py eval digits_ref.npz samples/digits/samples.npz      for all of ADM's numbers
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoints
import distributed
import fid
from data import DIGITS_CLASSES, DIGITS_LEVELS, DIGITS_SIZE, load_real_digits
from sample import generate, save_grid, to_uint8

DIGITS_SVC_GAMMA = 0.001  # RBF width of scikit-learn's digits example, for pixels in 0..16


def real_digits_uint8():
    """The 1,797 real digits as uint8 images [1797, 8, 8, 3] and their labels [1797]."""
    images, labels = load_real_digits()  # (1797, 8, 8) in [0, 1]
    return to_uint8(torch.from_numpy(2 * images - 1)[:, None]), labels


def reference_statistics(model, batch_size=50, preprocessing="tf"):
    """FID statistics (mu, sigma) of all real digits."""
    images, _ = real_digits_uint8()
    return fid.feature_statistics(fid.inception_features(images, model, batch_size, preprocessing,
                                                         label="demo: real digits"))


def _as_8x8_digits(images):
    """Generated digits -> (N, 8, 8) in [0, 1].

    Accepted: uint8 (0..255) or float in [0, 1]; (N, H, W) grayscale or (N, H, W, 3) RGB
    (averaged over channels); square H a multiple of 8 (area-averaged down to 8x8).
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images / 255
    elif np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"float digit images must lie in [0, 1], got "
                             f"[{images.min():.3g}, {images.max():.3g}]")
        images = images.astype(np.float64)
    else:
        raise ValueError(f"digit images must be uint8 or float in [0, 1], got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 3:
        images = images.mean(-1)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % DIGITS_SIZE:
        raise ValueError(f"digit images must be (N, H, W) or (N, H, W, 3) with H = W a multiple "
                         f"of {DIGITS_SIZE}, got {list(images.shape)}")
    n, k = len(images), images.shape[1] // DIGITS_SIZE
    return images.reshape(n, DIGITS_SIZE, k, DIGITS_SIZE, k).mean((2, 4))  # (N, 8, 8)


def train_digit_classifier(images=None, labels=None):
    """RBF SVC on digits (N, 8, 8) in [0, 1] (default: all real digits)."""
    from sklearn.svm import SVC
    if images is None:
        images, labels = load_real_digits()
    classifier = SVC(gamma=DIGITS_SVC_GAMMA)
    classifier.fit(np.asarray(images).reshape(len(images), -1) * DIGITS_LEVELS, labels)
    return classifier


def digit_class_accuracy(images, labels, classifier=None):
    """Share of generated digits that a classifier of real digits assigns their label.

    images: see _as_8x8_digits; labels (N,) the class each image was conditioned on.
    Returns {"accuracy": float, "per_class": (10,) array, nan for classes without images}.
    """
    digits = _as_8x8_digits(images)
    labels = np.asarray(labels)
    if labels.shape != (len(digits),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({len(digits)},), "
                         f"got {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= DIGITS_CLASSES):
        raise ValueError(f"labels must lie in 0..{DIGITS_CLASSES - 1}, "
                         f"got {labels.min()}..{labels.max()}")
    if classifier is None:
        classifier = train_digit_classifier()
    correct = classifier.predict(digits.reshape(len(digits), -1) * DIGITS_LEVELS) == labels
    per_class = np.array([correct[labels == c].mean() if (labels == c).any() else np.nan
                          for c in range(DIGITS_CLASSES)])
    return {"accuracy": float(correct.mean()), "per_class": per_class}


def _samples_npz(path):
    """arr_0 uint8 [N, H, W, 3] and labels int [N] of a sample.py .npz."""
    images = fid.open_images(path)
    with np.load(path) as data:
        if "labels" not in data.files:
            raise ValueError(f"{path}: no labels beside arr_0 (keys {data.files}); the digits "
                             "metrics need the class id of every sample")
        labels = data["labels"]
    return images, labels


def write_reference_batch(path):
    """The real digits as an ADM reference batch: arr_0 uint8 [1797, 8, 8, 3] (and labels)."""
    images, labels = real_digits_uint8()
    with checkpoints.atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, labels=labels)
    return images.shape


# ---------------------------------------------------------------------------------------
# The end of a digits run (train.py): loss curve and the class accuracy of EMA samples
# ---------------------------------------------------------------------------------------

def finish_run(ema, cfg, device, run_dir, step, stats):
    """Draw loss.png, sample cfg.eval_per_class EMA digits per class, write their class accuracy
    to eval.json and print where everything is."""
    plot_loss(stats, run_dir / "loss.png")
    print(f"loss curve: {run_dir / 'loss.png'}", flush=True)
    if not cfg.eval_per_class:
        return
    labels = np.repeat(np.arange(DIGITS_CLASSES), cfg.eval_per_class)
    x = generate(ema, labels, range(len(labels)), steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                 batch_size=len(labels), device=device)
    images = to_uint8(x)
    path = run_dir / "samples" / f"final_{step:07d}.png"
    save_grid(images, labels, path, ncol=cfg.eval_per_class)
    result = digit_class_accuracy(images, labels)
    record = {"step": step, "samples": len(labels), "sampler_steps": cfg.sample_steps,
              "cfg_scale": cfg.cfg_scale, "accuracy": result["accuracy"],
              "per_class": result["per_class"].tolist()}
    checkpoints.write_text(run_dir / "eval.json", json.dumps(record, indent=2) + "\n")
    print(f"class accuracy of {len(labels)} EMA samples ({cfg.eval_per_class} per class, "
          f"{cfg.sample_steps} sampler steps, guidance scale {1 + cfg.cfg_scale:g}, i.e. cfg-scale "
          f"s = {cfg.cfg_scale:g}) by an SVM of the real digits: {100 * result['accuracy']:.1f}%\n"
          f"samples: {path}", flush=True)


def plot_loss(stats, path, width=720, height=360):
    """The logged loss against the step on a log scale, drawn with pillow."""
    stats = [s for s in stats if "loss" in s]
    steps, losses = [s["step"] for s in stats], [s["loss"] for s in stats]
    if len(steps) < 2:
        return
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 24, 28, height - 36
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    hi = max(hi, lo + 1e-3)

    def xy(step, value):
        return (left + (step - steps[0]) / (steps[-1] - steps[0]) * (right - left),
                bottom - (math.log10(value) - lo) / (hi - lo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        value = 10 ** (lo + i * (hi - lo) / 4)
        y = xy(steps[0], value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = round(steps[0] + i * (steps[-1] - steps[0]) / 4)
        x = xy(step, losses[0])[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 12, bottom + 8), str(step), fill="black")
    draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(31, 119, 180), width=2)
    draw.text((left, 8), "training loss (multi-scale, log scale) against the step", fill="black")
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("fid", parents=[fid.common_options()],
                           help="FID against the real digits and class accuracy")
    score.add_argument("samples", help="sample.py .npz: arr_0 uint8 [N, H, W, 3], labels [N]")
    score.add_argument("--ref", help="reference: a stats .npz (fid.py ref) or an image .npz "
                                     "(default: the real digits)")
    batch = sub.add_parser("ref-batch", help="write the real digits as an ADM reference batch")
    batch.add_argument("-o", "--output", required=True, type=Path, help=".npz to write")
    args = parser.parse_args(argv)
    distributed.run_main(lambda: run(args))


def run(args):
    if args.command == "ref-batch":
        shape = write_reference_batch(args.output)
        print(f"wrote {args.output}: arr_0 uint8 {list(shape)}, labels")
        return
    images, labels = _samples_npz(args.samples)
    result = digit_class_accuracy(images, labels)
    model = fid.inception_model(args)
    if args.ref:
        mu_ref, sigma_ref = fid.statistics_of(args.ref, model, args.batch_size, args.preprocessing)
    else:
        mu_ref, sigma_ref = reference_statistics(model(), args.batch_size, args.preprocessing)
    features = fid.inception_features(images, model(), args.batch_size, args.preprocessing,
                                      label=f"demo: {Path(args.samples).name}")
    mu, sigma = fid.feature_statistics(features)
    print(f"FID: {fid.frechet_distance(mu, sigma, mu_ref, sigma_ref):.4f}")
    per_class = ", ".join(f"{c}: {a:.3f}" for c, a in enumerate(result["per_class"]))
    print(f"class accuracy: {result['accuracy']:.4f} ({per_class})")


if __name__ == "__main__":
    main()
