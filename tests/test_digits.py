"""Tests of the digits demo's metrics (support/digits.py, tools/digits.py): the real digits as
uint8 images and as an ADM reference batch (against the
rounding written out by hand), the digit classifier (against scikit-learn's published accuracy
and chance), its input checks, and the command line's plumbing."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

import fid
from support import digits
from support.digits import load_real_digits
from support.images import open_images as images_of
from tools import digits as digits_cli


def _expected_uint8():
    """load_digits' pixels k in 0..16 as 8-bit levels: round(255 k / 16), halves up."""
    levels = np.floor(255 * load_digits().images / 16 + 0.5).astype(np.uint8)  # (1797, 8, 8)
    return np.repeat(levels[..., None], 3, axis=-1)


def test_real_digits_as_uint8_images():
    images, labels = digits.real_digits_uint8()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 3)
    assert np.array_equal(images, _expected_uint8())
    assert np.array_equal(labels, load_digits().target)


def test_ref_batch_is_an_adm_reference_batch(tmp_path, capsys):
    digits_cli.main(["ref-batch", "-o", str(tmp_path / "digits_ref.npz")])
    assert capsys.readouterr().out.startswith("wrote ")
    images = images_of(tmp_path / "digits_ref.npz")  # arr_0 uint8 [N, H, W, 3]
    assert np.array_equal(images, _expected_uint8())


def test_digit_classifier_on_real_and_noise():
    # scikit-learn's digits example (SVC gamma=0.001, first half train, second half test)
    # reports about 0.97 accuracy; noise must land near chance (0.1).
    images, labels = load_real_digits()
    half = len(images) // 2
    classifier = digits.train_digit_classifier(images[:half], labels[:half])
    real = digits.digit_class_accuracy(images[half:], labels[half:], classifier)
    assert real["accuracy"] > 0.95
    assert np.nanmin(real["per_class"]) > 0.8
    noise = np.random.default_rng(6).uniform(size=(500, 8, 8))
    chance = digits.digit_class_accuracy(noise, labels[half:half + 500], classifier)
    assert chance["accuracy"] < 0.3


def test_digit_formats_are_equivalent():
    # uint8 RGB 32x32 (each pixel a 4x4 block) holds the same digits as float 8x8.
    images, labels = load_real_digits()
    images, labels = images[:200], labels[:200]
    classifier = digits.train_digit_classifier()
    big = np.repeat(np.repeat(digits.real_digits_uint8()[0][:200], 4, axis=1), 4, axis=2)
    quantised = np.floor(images * 255 + 0.5) / 255
    a = digits.digit_class_accuracy(big, labels, classifier)
    b = digits.digit_class_accuracy(quantised, labels, classifier)
    assert a["accuracy"] == b["accuracy"]
    assert np.array_equal(a["per_class"], b["per_class"])
    only_zeros = digits.digit_class_accuracy(images[labels == 0], labels[labels == 0], classifier)
    assert np.isnan(only_zeros["per_class"][1:]).all()


def test_digit_input_errors():
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        digits.digit_class_accuracy(np.full((2, 8, 8), 16.0), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="multiple of 8"):
        digits.digit_class_accuracy(np.zeros((2, 12, 12)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        digits.digit_class_accuracy(np.zeros((2, 8, 8)), np.array([0, 10]))
    with pytest.raises(ValueError, match="labels must be integers of shape \\(2,\\)"):
        digits.digit_class_accuracy(np.zeros((2, 8, 8)), np.zeros(3, np.int64))


class _Moments(torch.nn.Module):
    """Stand-in network: pool = mean, mean square and max of each preprocessed image."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        pool = torch.stack([x.mean((1, 2, 3)), (x ** 2).mean((1, 2, 3)), x.amax((1, 2, 3))], 1)
        return fid.Activations(pool, pool, None)


def test_fid_command_prints_fid_and_class_accuracy(tmp_path, monkeypatch, capsys):
    # 120 real digits as samples, labelled with their classes, against themselves as the
    # reference: FID 0; the accuracy is that of scikit-learn's digits SVC (gamma 0.001, pixels
    # 0..16) trained on all real digits, on the samples' 8-bit pixels.
    images, labels = digits.real_digits_uint8()
    np.savez(tmp_path / "samples.npz", arr_0=images[:120], labels=labels[:120])
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: _Moments())
    digits_cli.main(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz")])
    fid_line, accuracy_line = capsys.readouterr().out.strip().splitlines()
    assert abs(float(fid_line.removeprefix("FID: "))) < 1e-3
    svc = SVC(gamma=0.001).fit(load_digits().data, load_digits().target)
    correct = svc.predict(images[:120, :, :, 0].reshape(120, 64) / 255 * 16) == labels[:120]
    per_class = ", ".join(f"{c}: {correct[labels[:120] == c].mean():.3f}" for c in range(10))
    assert accuracy_line == f"class accuracy: {correct.mean():.4f} ({per_class})"
    assert correct.mean() > 0.95
    # against other real digits (the next 120), the distance is not 0
    np.savez(tmp_path / "other.npz", arr_0=images[120:240])
    digits_cli.main(["fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "other.npz")])
    assert float(capsys.readouterr().out.splitlines()[0].removeprefix("FID: ")) > 1e-3


def test_fid_command_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "unlabelled.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        digits_cli.main(["fid", str(tmp_path / "unlabelled.npz")])
    assert str(e.value).startswith("error: ") and "no labels" in str(e.value)
    assert "\n" not in str(e.value)
