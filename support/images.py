"""Images in and out: model pixels to uint8, labelled grids, and image sets on disk, as sample.py
writes them and fid.py reads them.

- The ADM layout: an .npz whose arr_0 is uint8 [N, H, W, 3] (RGB), with labels int64 [N] where
  known. `write_npz` streams it from parts without holding every image in memory (50K images at
  512 px are 39 GB); `npz_images` memory-maps arr_0 when it is stored uncompressed, as np.savez
  and sample.py store it.
- A folder of images (recursive), all RGB and of one size.
"""
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from support import checkpoints

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ADM_LAYOUT = "arr_0 uint8 [N, H, W, 3] (RGB), as sample.py and ADM's reference batches store it"
GRID_MIN_CELL = 64  # images smaller than this many pixels are upscaled (nearest) in a grid
GRID_PAD = 4  # white pixels around each grid cell


def to_uint8(x):
    """Images in [-1, 1] (N, C, H, W), C = 1 or 3 -> uint8 (N, H, W, 3): round(127.5 (x + 1)),
    clipped."""
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # floor(v + 0.5) = round
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, labels, path, ncol=None):
    """A grid PNG of uint8 images (N, H, W, 3), each with its class id written under it.

    Images smaller than GRID_MIN_CELL pixels are upscaled by an integer factor (nearest) so that
    8x8 digits stay visible. Returns the upscale factor.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    scale = max(1, math.ceil(GRID_MIN_CELL / min(h, w)))
    font = ImageFont.load_default()
    text_h = font.getbbox("0123456789")[3] + 4
    pad = GRID_PAD
    cell_w, cell_h = w * scale + pad, h * scale + text_h + pad
    grid = Image.new("RGB", (ncol * cell_w + pad, nrow * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x0, y0 = pad + (i % ncol) * cell_w, pad + (i // ncol) * cell_h
        grid.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x0, y0))
        draw.text((x0, y0 + h * scale + 1), str(int(label)), fill="black", font=font)
    with checkpoints.atomic_write(path, suffix=".png") as tmp:
        grid.save(tmp)
    return scale


def write_npz(path, parts, labels):
    """Stream the uint8 part arrays (read in order, one chunk at a time) into an ADM .npz.

    Keys: arr_0 uint8 [N, H, W, 3] (the concatenation of `parts`) and labels int64 [N]; written
    as np.savez does (an uncompressed zip of .npy files), atomically.
    """
    n = sum(len(p) for p in parts)
    shape = (n, *parts[0].shape[1:])
    with checkpoints.atomic_write(path) as tmp, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False, "shape": shape})
            for part in parts:
                for start in range(0, len(part), 1024):
                    f.write(np.ascontiguousarray(part[start:start + 1024],
                                                 dtype=np.uint8).tobytes())
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))


def npz_array(path, key):
    """One array of an .npz, or None without that key; memory-mapped when it is stored
    uncompressed, so that 50K images need not fit in memory (np.load's copy otherwise)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                return None
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if info.compress_type != zipfile.ZIP_STORED or read_header is None:
                    with np.load(path) as data:
                        return data[key]
                shape, fortran, dtype = read_header(f)
                header_size = f.tell()
        with open(path, "rb") as f:  # the member's data follow its local header and .npy header
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<26xHH", f.read(30))
        offset = info.header_offset + 30 + name_len + extra_len + header_size
        return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e}); expected {ADM_LAYOUT}") from None


def npz_images(path):
    """arr_0 of an .npz in the ADM layout (memory-mapped when possible), checked."""
    images = npz_array(path, "arr_0")
    if images is None:
        with np.load(path) as data:
            raise ValueError(f"{path}: no arr_0 in this .npz (keys: {data.files}); expected "
                             f"images as {ADM_LAYOUT}, or statistics as mu, sigma")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, expected "
                         f"{ADM_LAYOUT} (grayscale: repeat the channel; RGBA: drop alpha; "
                         "floats: round 255 x to uint8)")
    if len(images) == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return images


def folder_images(folder):
    """Sorted image paths under folder (recursive), checked to be RGB and of one size."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    size = None
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                mode, this = im.mode, im.size
        except OSError as e:
            raise ValueError(f"{p}: not a readable image ({e})") from None
        if mode != "RGB":
            raise ValueError(f"{p}: image mode {mode}, FID needs RGB images (convert them "
                             "explicitly, e.g. PIL's Image.convert('RGB'))")
        if size is not None and this != size:
            raise ValueError(f"{p}: size {this} differs from {size} of {paths[0]}")
        size = this
    return paths


def open_images(path):
    """A folder of images or an image .npz -> uint8 array [N, H, W, 3] or a list of paths."""
    path = Path(path)
    if path.is_dir():
        return folder_images(path)
    if path.is_file() and path.suffix == ".npz":
        return npz_images(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    raise ValueError(f"{path}: expected a folder of images or an .npz with {ADM_LAYOUT}")


def image_size(images):
    """(H, W) of an image set from open_images."""
    if isinstance(images, np.ndarray):
        return images.shape[1:3]
    with Image.open(images[0]) as im:
        return im.size[::-1]


def read_batches(images, start, stop, batch_size):
    """Yield uint8 batches [B, H, W, 3] of images[start:stop] (an array or a list of paths)."""
    for i in range(start, stop, batch_size):
        chunk = images[i:min(i + batch_size, stop)]
        if isinstance(chunk, np.ndarray):
            yield np.array(chunk)  # read from a memory map, writable for torch
        else:
            yield np.stack([np.asarray(Image.open(p)) for p in chunk])
