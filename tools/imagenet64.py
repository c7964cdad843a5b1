"""Downsampled ImageNet (ImageNet 64 of DiMR-M/3R and L/3R) as one memory-mapped uint8 file.

    python -m tools.imagenet64 /data/imagenet64 --out in64.npy
    torchrun --nproc_per_node=8 train.py --variant m --data in64.npy

The download (Chrabaszcz et al. 2017, image-net.org) is a folder of compressed .npz files
(Imagenet64_train_part1.npz, ... or train_data_batch_1.npz, ...): `data` uint8 [N, 3*64*64] (the
R, G and B planes of each image) and 1-based `labels`. Read as they are, every training process
decompresses all of them into its own memory: 14.7 GiB per process, 118 GiB on an 8-GPU node.
This writes them once as OUT (uint8 [N, 3, 64, 64], the planes as they are) and OUT_labels.npy
(int64, 0-based), which train.py memory-maps: the processes of a node then share one copy in the
page cache.

The conversion streams each file's `data` in chunks of --chunk rows (bounded memory, whatever the
size of the set) into OUT's temporary file, and records after each source file that it is done
(OUT.progress.json, written after the rows reach the disk). Interrupted, it resumes with the first
file not done when run again; OUT appears, by a rename, only when complete.
"""
import json
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from support import checkpoints, data, distributed
from support.cli import Parser, number
from support.progress import Progress


def npy_member(zf, name):
    """(file object positioned at the array's data, shape, dtype) of NAME.npy inside an .npz."""
    f = zf.open(f"{name}.npy")
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    if fortran:
        raise ValueError(f"{zf.filename}: {name} is stored in Fortran order")
    return f, shape, dtype


def read_labels(path):
    """The labels of one source file, 0-based, and its image side S, checked without reading
    its data."""
    try:
        with zipfile.ZipFile(path) as zf:
            missing = {f"{k}.npy" for k in data.DOWNSAMPLED_KEYS} - set(zf.namelist())
            if missing:
                raise ValueError(f"{path}: no {sorted(missing)}, expected "
                                 f"{data.DOWNSAMPLED_LAYOUT}")
            f, shape, dtype = npy_member(zf, "data")
            f.close()
            with zf.open("labels.npy") as g:
                labels = np.asarray(np.lib.format.read_array(g))
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"cannot read {path} as an .npz: {e}") from None
    side = math.isqrt(shape[1] // 3) if len(shape) == 2 else 0
    if dtype != np.uint8 or side < 1 or 3 * side * side != shape[1]:
        raise ValueError(f"{path}: data must be uint8 [N, 3*S*S] (R, G, B planes), got {dtype} "
                         f"{list(shape)}")
    if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer) \
            or labels.min() < 1 or labels.max() > data.IMAGENET_CLASSES:
        raise ValueError(f"{path}: labels must be {shape[0]} class ids in "
                         f"1..{data.IMAGENET_CLASSES} (1-based)")
    return labels.astype(np.int64) - 1, side


def copy_rows(path, out, offset, chunk, progress):
    """Stream the `data` rows of one source file into the open file `out` from byte `offset`,
    `chunk` rows at a time (plain writes: no mapping, so memory stays one chunk). A corrupt or
    truncated source is a ValueError naming it; a failed write a WriteError naming `out`."""
    try:
        with zipfile.ZipFile(path) as zf:
            f, (n, row), _ = npy_member(zf, "data")
            with f:
                out.seek(offset)
                for lo in range(0, n, chunk):
                    rows = min(chunk, n - lo)
                    buf = f.read(rows * row)
                    if len(buf) != rows * row:
                        raise EOFError(f"{len(buf)} of {rows * row} bytes at row {lo}")
                    write(out, buf)
                    progress.update(rows)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: a corrupt or truncated .npz ({e})") from None


def write(out, buf):
    try:
        out.write(buf)
    except OSError as e:
        raise checkpoints.WriteError(f"cannot write {out.name}: {checkpoints.plain_cause(e)}"
                                     ) from None


def run(args):
    source = Path(args.folder)
    files = sorted(source.glob(data.DOWNSAMPLED_GLOB)) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no {data.DOWNSAMPLED_GLOB} files")
    out = Path(args.out)
    start_time = time.time()
    parts = [read_labels(f) for f in files]
    sides = {side for _, side in parts}
    if len(sides) > 1:
        raise ValueError(f"{source}: files of different image sizes {sorted(sides)}")
    side, n = sides.pop(), sum(len(labels) for labels, _ in parts)
    shape = (n, 3, side, side)
    tmp, record = out.with_name(f".{out.name}.partial"), out.with_name(f"{out.name}.progress.json")
    plan = {"files": [str(f.resolve()) for f in files], "shape": list(shape)}
    state = json.loads(record.read_text()) if record.is_file() and tmp.is_file() else {}
    done = state.get("done", []) if state.get("plan") == plan else []
    header = np.lib.format.open_memmap(tmp, mode="r+" if done else "w+", dtype=np.uint8,
                                       shape=shape)  # the .npy header; the rows stay unwritten
    start, row_bytes = header.offset, 3 * side * side
    del header
    offsets = np.cumsum([0] + [len(labels) for labels, _ in parts])
    todo = [k for k in range(len(files)) if str(files[k].resolve()) not in done]
    print(f"{len(files)} files, {n} images of {side}x{side}x3 -> {out} "
          f"({n * row_bytes / 2 ** 30:.1f} GiB); {len(files) - len(todo)} already done",
          flush=True)
    progress = Progress("imagenet64", sum(len(parts[k][0]) for k in todo), every=10.0)
    with open(tmp, "r+b") as f:
        for k in todo:
            copy_rows(files[k], f, start + offsets[k] * row_bytes, args.chunk, progress)
            try:
                f.flush()
                os.fsync(f.fileno())  # the rows are on disk before the record says so
            except OSError as e:
                raise checkpoints.WriteError(f"cannot write {tmp}: {checkpoints.plain_cause(e)}"
                                             ) from None
            done.append(str(files[k].resolve()))
            checkpoints.write_text(record, json.dumps({"plan": plan, "done": done}) + "\n")
    with checkpoints.atomic_write(data.labels_npy_path(out)) as labels_tmp, \
            open(labels_tmp, "wb") as f:
        np.save(f, np.concatenate([labels for labels, _ in parts]))
    os.replace(tmp, out)
    record.unlink()
    print(f"wrote {out} and {data.labels_npy_path(out)} in {time.time() - start_time:.1f} s",
          flush=True)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the downsampled ImageNet folder (its *train*.npz files), or "
                                  "one such file")
    p.add_argument("--out", required=True, help="the .npy to write (and OUT_labels.npy)")
    p.add_argument("--chunk", type=number(int, 1), default=8192,
                   help="rows read and written at a time (8192 rows of 64 px: 100 MB)")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
