"""The digits demo's data and its metrics of a model's samples.

The demo trains DiMR-S/2R on scikit-learn's 1,797 real 8x8 grayscale digits (`load_real_digits`;
support/data.py makes them training data). Its class-conditional samples are measured
- by class accuracy: the share of samples that an RBF SVM trained on the real digits
  (scikit-learn's digits example) assigns the class they were conditioned on. train.py prints it
  at the end of a digits run (`evaluate`, the data set's own metric: TrainingData.evaluate);
- by the SVM's confidence in the conditioned class (`class_confidence`), tools/table5.py's
  distortion in miniature;
- by FID against the real digits: fid.py's Inception on both, each 8x8 image resized to 299x299
  like any other (docs/evaluation.md). The real digits are written once as an ADM reference batch
  (`reference_batch_path`), whose features fid.py caches beside it.

A real digit v in [0, 1] is the image 2 v - 1 in [-1, 1], the training data's scale, and becomes
uint8 through support/images.to_uint8, exactly as the samples do. The command line:
tools/digits.py.
"""
import json
from pathlib import Path

import numpy as np
import torch

from support import checkpoints
from support.images import save_grid, to_uint8

DIGITS_SIZE = 8  # load_digits images are 8x8
DIGITS_SIZES = (DIGITS_SIZE, 2 * DIGITS_SIZE, 4 * DIGITS_SIZE)  # native, and upsampled
DIGITS_LEVELS = 16  # load_digits pixels take the values 0..16
DIGITS_CLASSES = 10
DIGITS_SVC_GAMMA = 0.001  # RBF width of scikit-learn's digits example, for pixels in 0..16
CACHE = Path.home() / ".cache" / "dimr"


def load_real_digits():
    """The real digits as images (1797, 8, 8) in [0, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images / DIGITS_LEVELS, digits.target.astype(np.int64)


def real_digits_uint8():
    """The 1,797 real digits as uint8 images [1797, 8, 8, 3] and their labels [1797]."""
    images, labels = load_real_digits()  # (1797, 8, 8) in [0, 1]
    return to_uint8(torch.from_numpy(2 * images - 1)[:, None]), labels


def as_8x8_digits(images):
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


def train_digit_classifier(images=None, labels=None, probability=False):
    """RBF SVC on digits (N, 8, 8) in [0, 1] (default: all real digits). probability=True: the
    same SVC with class probabilities, Platt-scaled on 5-fold cross-validated decisions
    (scikit-learn's CalibratedClassifierCV, folds in data order, so deterministic)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC
    if images is None:
        images, labels = load_real_digits()
    classifier = SVC(gamma=DIGITS_SVC_GAMMA)
    if probability:
        classifier = CalibratedClassifierCV(classifier, ensemble=False, cv=5)
    classifier.fit(np.asarray(images).reshape(len(images), -1) * DIGITS_LEVELS, labels)
    return classifier


def digit_class_accuracy(images, labels, classifier=None):
    """Share of generated digits that a classifier of real digits assigns their label.

    images: see as_8x8_digits; labels (N,) the class each image was conditioned on.
    Returns {"accuracy": float, "per_class": (10,) array, nan for classes without images}.
    """
    digits = as_8x8_digits(images)
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


def class_confidence(images, labels, classifier=None):
    """(N,) the probability a classifier of the real digits gives each digit's conditioned class
    (default: train_digit_classifier(probability=True) on all real digits, which never saw a
    generated one). images: see as_8x8_digits; labels (N,) ints in 0..9."""
    digits = as_8x8_digits(images)
    if classifier is None:
        classifier = train_digit_classifier(probability=True)
    p = classifier.predict_proba(digits.reshape(len(digits), -1) * DIGITS_LEVELS)  # (N, 10)
    return p[np.arange(len(digits)), np.searchsorted(classifier.classes_, labels)]


def real_digits_confidence(folds=5):
    """class_confidence's control: (1797,) the probability each real digit gets for its own class
    from a classifier that did not see it (trained on the other folds, folds in data order), the
    digit scored as uint8 exactly as a sample is. Returns it and each digit's fold (1797,)."""
    images, labels = load_real_digits()
    scored = real_digits_uint8()[0]
    fold = np.arange(len(labels)) * folds // len(labels)
    confidence = np.zeros(len(labels))
    for k in range(folds):
        held = fold == k
        classifier = train_digit_classifier(images[~held], labels[~held], probability=True)
        confidence[held] = class_confidence(scored[held], labels[held], classifier)
    return confidence, fold


def evaluate(images, labels, run_dir, step, settings):
    """The end of a digits run (train.py): the EMA samples `images` uint8 (N, S, S, 3), S in
    DIGITS_SIZES, of the classes `labels` (N,), drawn with settings {sampler_steps, guidance}:
    their grid (samples/final_NNNNNNN.png) and class accuracy (eval.json). Returns the line to
    print."""
    path = Path(run_dir) / "samples" / f"final_{step:07d}.png"
    save_grid(images, labels, path, ncol=max(1, len(labels) // DIGITS_CLASSES))
    result = digit_class_accuracy(images, labels)
    record = {"step": step, "samples": len(labels), **settings, "accuracy": result["accuracy"],
              "per_class": result["per_class"].tolist()}
    checkpoints.write_text(Path(run_dir) / "eval.json", json.dumps(record, indent=2) + "\n")
    note = ""
    if result["accuracy"] < 0.5:
        note = (f" (after {step} steps the model has not learned the digits yet, and the EMA "
                "weights sampled here lag behind it; chance is 10%, and the full demo, `python "
                "train.py`, reaches about 100%)")
    s = settings["guidance"]
    return (f"class accuracy of {len(labels)} EMA samples (evenly over the {DIGITS_CLASSES} "
            f"classes, {settings['sampler_steps']} sampler steps, guidance scale {1 + s:g}, i.e. "
            f"cfg-scale s = {s:g}) by an SVM of the real digits: "
            f"{100 * result['accuracy']:.1f}%{note}\nsamples: {path}")


def write_reference_batch(path):
    """The real digits as an ADM reference batch: arr_0 uint8 [1797, 8, 8, 3] (and labels)."""
    images, labels = real_digits_uint8()
    with checkpoints.atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, labels=labels)
    return images.shape


def reference_batch_path(cache_dir=CACHE):
    """The real digits' reference batch, written once into cache_dir; fid.reference_batch caches
    its Inception features beside it, so they too are computed once."""
    path = Path(cache_dir) / "digits_ref.npz"
    if not path.is_file():
        write_reference_batch(path)
    return path
