"""The digits demo's metrics of a sample.py .npz: FID against the real digits and class accuracy.

    python -m tools.digits fid samples/digits/samples.npz [--ref digits_stats.npz]
    python -m tools.digits ref-batch -o digits_ref.npz    the real digits as an ADM reference batch
    python fid.py eval digits_ref.npz samples/digits/samples.npz      for all of ADM's numbers

Without --ref the reference is the 1,797 real digits, written once as a reference batch into
--cache-dir, with their Inception features cached beside it (fid.reference_batch): only the first
call computes them.
"""
from pathlib import Path

import numpy as np

import fid
from support import digits, distributed, images as image_files, inception
from support.cli import Parser


def samples_npz(path):
    """arr_0 uint8 [N, H, W, 3] and labels int [N] of a sample.py .npz."""
    images = image_files.npz_images(path)
    with np.load(path) as data:
        if "labels" not in data.files:
            raise ValueError(f"{path}: no labels beside arr_0 (keys {data.files}); the digits "
                             "metrics need the class id of every sample")
        labels = data["labels"]
    return images, labels


def run(args):
    if args.command == "ref-batch":
        shape = digits.write_reference_batch(args.output)
        print(f"wrote {args.output}: arr_0 uint8 {list(shape)}, labels")
        return
    images, labels = samples_npz(args.samples)
    accuracy = digits.digit_class_accuracy(images, labels)
    get_inception = fid.inception_getter(args)
    if args.ref:
        mu_ref, sigma_ref = fid.statistics_of(fid.open_source(args.ref, args.preprocessing),
                                              get_inception, args.batch_size, args.preprocessing,
                                              reference=True)
    else:
        ref = fid.reference_batch(digits.reference_batch_path(args.cache_dir), get_inception,
                                  args.batch_size, args.preprocessing,
                                  args.weights or inception.DEFAULT_NAME)
        mu_ref, sigma_ref = ref["mu"], ref["sigma"]
    features = fid.inception_features(images, get_inception(), args.batch_size, args.preprocessing,
                                      label=f"digits: {Path(args.samples).name}")
    print(f"FID: {fid.frechet_distance(*fid.feature_statistics(features), mu_ref, sigma_ref):.4f}")
    per_class = ", ".join(f"{c}: {a:.3f}" for c, a in enumerate(accuracy["per_class"]))
    print(f"class accuracy: {accuracy['accuracy']:.4f} ({per_class})")


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    main()
