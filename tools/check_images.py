"""Find the unreadable files of a class-per-folder image directory before a run meets them.

    python -m tools.check_images /data/imagenet/train --workers 16

Every file with an image extension is decoded as training does (support/data.py: pillow, RGB,
ADM's center crop); each one that fails is printed on a line of its own with the reason, and the
exit status is 1 if there was any. A class folder without images is an error here as in training,
before any file is decoded. Training stops at the
first bad file it meets, with one line naming it; this finds them all at once, so that they can
be removed (or replaced) before a long run. Nothing is skipped silently: a data set that loses
files changes the order of every later batch, and with it what a resumed run computes.
"""
from concurrent.futures import ProcessPoolExecutor

from support import data, distributed
from support.cli import Parser, number
from support.progress import Progress

CHUNK = 256  # files per task of a worker


def bad_files(paths, image_size):
    """[(path, reason)] of the files that do not decode."""
    bad = []
    for path in paths:
        try:
            data.read_image(path, image_size)
        except ValueError as e:
            bad.append((path, str(e)))
    return bad


def run(args):
    samples, classes = data.folder_samples(args.folder)
    paths = [path for path, _ in samples]
    progress = Progress("check", len(paths), unit="files", every=10.0)
    found = []
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ProcessPoolExecutor(args.workers) as pool:
        for chunk, bad in zip(chunks, pool.map(bad_files, chunks, [args.image_size] * len(chunks))):
            for _, reason in bad:
                print(reason, flush=True)
            found += bad
            progress.update(len(chunk))
    print(f"{len(found)} unreadable of {len(paths)} files in {len(classes)} classes")
    if found:
        raise SystemExit(1)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="image folder with one sub-folder per class")
    p.add_argument("--image-size", type=number(int, 1), default=64,
                   help="center-crop size to decode at (the crop never fails where the decode "
                        "succeeds; default 64)")
    p.add_argument("--workers", type=number(int, 1), default=4, help="decoding processes")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
