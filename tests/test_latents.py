"""The latent path (issue 7) without any download: a randomly initialised tiny AutoencoderKL built
from a config stands in for the Stable Diffusion VAE; extraction -> shards -> train.py -> sample.py
-> decoding, and a release-format checkpoint -> tools/convert.py -> sample.py.

Most tests need diffusers (pip install -r requirements-latent.txt). The README's test command
installs it, so without it they fail instead of skipping."""
import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dimr
import sample
from diffusion import ode_sample
from support import checkpoints, data, vae as vae_lib
from tools import convert, extract_latents
from release_reference import release_forward, release_state_dict

DATA = Path(__file__).parent / "data"
# the Stable Diffusion VAE's latent scale (LDM), written out independently of support/vae.py
SCALE = 0.18215
IMAGE_SIZE = 64  # 64 px images -> 8x8x4 latents with the tiny f8 autoencoder
TINY_DIMR = dict(widths=(32, 16), depths=(2, 2), num_heads=2)


def needs_diffusers():
    try:
        import diffusers
    except ImportError as e:
        pytest.fail(f"diffusers is missing ({e}): pip install -r requirements-latent.txt")
    return diffusers


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A KL-f8 AutoencoderKL (4 down blocks, 4 latent channels) with random weights, saved like a
    hub model."""
    diffusers = needs_diffusers()
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4,
                                    block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE)
    path = tmp_path_factory.mktemp("vae") / "tiny-kl-f8"
    model.save_pretrained(path)
    return path


def reference_vae(path):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).eval()


def make_image_folder(root):
    """Two classes (sorted: 'a_cls' = 0, 'b_cls' = 1), five images of assorted sizes, modes and
    formats."""
    g = np.random.default_rng(0)
    files = {"b_cls/x.png": (90, 70, "RGB"), "b_cls/y.jpg": (64, 64, "RGB"),
             "a_cls/p.png": (150, 80, "L"), "a_cls/q.png": (66, 200, "RGB"),
             "a_cls/r.png": (130, 129, "RGBA")}
    for name, (w, h, mode) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = g.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(root / name)
    return [root / "a_cls/p.png", root / "a_cls/q.png", root / "a_cls/r.png", root / "b_cls/x.png",
            root / "b_cls/y.jpg"], [0, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_vae_dir):
    root = tmp_path_factory.mktemp("latents")
    files, labels = make_image_folder(root / "images")
    argv = ["--data-path", str(root / "images"), "--image-size", str(IMAGE_SIZE),
            "--out", str(root / "shards"), "--vae", str(tiny_vae_dir), "--shard-size", "2",
            "--batch-size", "3", "--workers", "0", "--dtype", "float32",
            "--npy", str(root / "all.npy")]
    extract_latents.main(argv)
    return root, argv, files, labels


# ----------------------------------------------------------------------------------------------
# Without diffusers

def test_shard_format_round_trips_through_data(tmp_path):
    g = np.random.default_rng(1)
    shards = [(g.standard_normal((n, 4, 8, 8)).astype(np.float16), g.integers(0, 1000, n))
              for n in (6, 4)]
    for k, (lat, lab) in enumerate(shards):
        extract_latents.save_shard(tmp_path / f"shard_{k:05d}.npz", lat, lab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.npz", "shard_00001.npz"]
    latents, labels = data.load_latents(tmp_path)
    assert latents.dtype == np.float16 and latents.shape == (10, 4, 8, 8)
    np.testing.assert_array_equal(latents, np.concatenate([s[0] for s in shards]))
    np.testing.assert_array_equal(labels, np.concatenate([s[1] for s in shards]))
    with np.load(tmp_path / "shard_00001.npz") as f:
        assert sorted(f.files) == ["labels", "latents"]
    extract_latents.merge_to_npy(sorted(tmp_path.glob("shard_*.npz")), tmp_path / "all.npy")
    merged, merged_labels = data.load_latents(tmp_path / "all.npy")
    np.testing.assert_array_equal(merged, latents)
    np.testing.assert_array_equal(merged_labels, labels)
    # no temporary files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npy", "all_labels.npy",
                                                          "shard_00000.npz", "shard_00001.npz"]


def latent_checkpoint(path, seed=0, num_classes=3):
    torch.manual_seed(seed)
    model = dimr.DiMR(dimr.get_config("s", in_channels=4, num_classes=num_classes,
                                      **TINY_DIMR)).eval()
    sd = model.state_dict()
    checkpoints.save({"config": dataclasses.asdict(model.config), "model": sd, "ema": sd}, path)
    return model


def test_missing_diffusers_says_what_to_install(tmp_path, monkeypatch):
    ckpt = tmp_path / "latent.pt"
    latent_checkpoint(ckpt)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError, match="pip install -r requirements-latent.txt"):
        vae_lib.load_vae("whatever")
    with pytest.raises(SystemExit) as e:
        sample.main([str(ckpt), "--num-images", "1", "--out", str(tmp_path / "o")])
    assert str(e.value) == "error: latent models need the optional `diffusers` package: " \
                           "pip install -r requirements-latent.txt"


def test_decode_to_uint8_refuses_latents_without_a_vae():
    cfg = dimr.get_config("s", in_channels=4)
    with pytest.raises(ValueError, match="latent model"):
        sample.decode_to_uint8(torch.zeros(1, 4, 8, 8), cfg)


# ----------------------------------------------------------------------------------------------
# The VAE

def test_vae_scales_the_posterior_mean(tiny_vae_dir):
    ref = reference_vae(tiny_vae_dir)
    vae = vae_lib.load_vae(tiny_vae_dir)
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae_lib.encode(vae, x)
    assert z.shape == (2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    with torch.no_grad():
        torch.testing.assert_close(z, ref.encode(x).latent_dist.mean * SCALE)
        torch.testing.assert_close(vae_lib.decode(vae, z), ref.decode(z / SCALE).sample)
    assert vae_lib.LATENT_SCALE == SCALE and vae_lib.DOWNSAMPLE == 8


def test_vae_in_chunks_equals_one_call(tiny_vae_dir):
    """5 images through encode / decode 2 at a time (3 calls) give the reference's single-batch
    result."""
    ref = reference_vae(tiny_vae_dir)
    vae = vae_lib.load_vae(tiny_vae_dir)
    x = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(x).latent_dist.mean * SCALE
        x_ref = ref.decode(z_ref / SCALE).sample
    torch.testing.assert_close(vae_lib.encode(vae, x, chunk=2), z_ref)
    torch.testing.assert_close(vae_lib.decode(vae, z_ref, chunk=2), x_ref)


def test_load_vae_errors(tmp_path):
    needs_diffusers()
    with pytest.raises(FileNotFoundError, match="VAE file or directory not found"):
        vae_lib.load_vae(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load the VAE"):
        vae_lib.load_vae(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# The release's VAE file: LDM key names (U-ViT's autoencoder_kl_ema.pth), converted by vae.from_ldm

def random_ldm_state_dict(shapes, seed):
    """Random weights for (name, shape) pairs, drawn in that order from one generator: kernels
    N(0, 1 / fan_in), GroupNorm gains 1 + N(0, 0.1^2), other vectors N(0, 0.1^2). The fixture
    tests/data/release_vae_tiny.json holds what the release's own code computes with these
    weights (its "made_by" says how it was made)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes:
        w = torch.randn(shape, generator=g)
        if len(shape) > 1:
            sd[name] = w / torch.tensor(shape[1:]).prod().sqrt()
        elif name.split(".")[-2].startswith("norm") and name.endswith("weight"):
            sd[name] = 1 + 0.1 * w
        else:
            sd[name] = 0.1 * w
    return sd


def release_vae_tiny():
    """The release autoencoder's design at ch 32, ch_mult (1, 2, 2), 1 res block: its keys and
    shapes, and its decode / encode_moments on fixed inputs (run by its libs/autoencoder.py)."""
    return json.loads((DATA / "release_vae_tiny.json").read_text())


def test_release_vae_file_decodes_and_encodes_like_the_release(tmp_path):
    """The LDM-format file, bare (.pth, as U-ViT ships it) or nested under 'state_dict' (.ckpt, as
    LDM saves it), through load_vae: decode(z) and the scaled posterior mean equal the release's
    FrozenAutoencoderKL.decode(z) and encode_moments(x)[:, :4] * 0.18215."""
    fixture = release_vae_tiny()
    sd = random_ldm_state_dict(fixture["state_dict"], fixture["seed"])
    torch.save(sd, tmp_path / "autoencoder.pth")
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "autoencoder.ckpt")
    for path in (tmp_path / "autoencoder.pth", tmp_path / "autoencoder.ckpt"):
        vae = vae_lib.load_vae(path)
        assert vae.config.block_out_channels == (32, 64, 64) and vae.config.layers_per_block == 1
        torch.testing.assert_close(vae_lib.decode(vae, torch.tensor(fixture["z"])),
                                   torch.tensor(fixture["decoded"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae_lib.encode(vae, torch.tensor(fixture["x"])),
                                   torch.tensor(fixture["latent_mean"]), rtol=1e-5, atol=1e-6)


def test_release_vae_keys_fill_the_stable_diffusion_vae():
    """The release autoencoder's 248 keys and shapes at its real size (the state_dict of its
    libs/autoencoder.py get_model, printed as tests/data/release_autoencoder_kl_state_dict.txt)
    fill diffusers' AutoencoderKL with the SD VAE's config, every weight used once (meta tensors,
    nothing allocated)."""
    sd = {}
    for line in (DATA / "release_autoencoder_kl_state_dict.txt").read_text().splitlines():
        name, shape = line.split(" ", 1)
        sd[name] = torch.empty(ast.literal_eval(shape), device="meta")
    with torch.device("meta"):
        vae = vae_lib.from_ldm(sd, "autoencoder_kl_ema.pth")
    c = vae.config
    assert (c.block_out_channels, c.layers_per_block, c.latent_channels, c.norm_num_groups,
            c.in_channels, c.out_channels) == ((128, 256, 512, 512), 2, 4, 32, 3, 3)
    assert len(sd) == 248
    assert sum(p.numel() for p in vae.parameters()) == sum(w.numel() for w in sd.values()) \
        == 83_653_863


def test_release_vae_file_errors(tmp_path):
    fixture = release_vae_tiny()
    sd = random_ldm_state_dict(fixture["state_dict"], fixture["seed"])

    def error(content):
        path = tmp_path / "bad.pth"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(ValueError) as e:
            vae_lib.load_vae(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "unexpected keys loss.logvar" in error({**sd, "loss.logvar": torch.zeros(())})
    missing = {k: w for k, w in sd.items() if k != "decoder.up.0.block.1.conv2.bias"}
    assert error(missing).endswith(
        "no weights for diffusers' decoder.up_blocks.2.resnets.1.conv2.bias")  # LDM's level 0
    assert error({**sd, "decoder.conv_in.weight": torch.zeros(64, 8, 3, 3)}).endswith(
        "wrong shapes decoder.conv_in.weight (64, 8, 3, 3) (expected (64, 4, 3, 3))")
    assert error({**sd, "decoder.mid.attn_1.q.weight": torch.zeros(64, 64, 3, 3)}).endswith(
        "wrong shapes decoder.mid.attn_1.q.weight (64, 64, 3, 3) (expected (64, 64))")
    assert error({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}).endswith(
        "no key encoder.down.0.block.0.conv1.weight")
    assert error({"state_dict": [1, 2]}).endswith("expected a state_dict of tensors, got list")
    assert error([1, 2]).endswith("expected a dict checkpoint, got list")
    assert error(b"not a checkpoint").startswith(f"cannot read checkpoint {tmp_path / 'bad.pth'}")
    # weights_only=True: pickled objects other than tensors and containers are refused, not run
    assert "pickled Python code" in error({"state_dict": sd, "args": argparse.Namespace()})


# ----------------------------------------------------------------------------------------------
# Extraction

def test_extraction_encodes_each_image_and_its_flip(extracted, tiny_vae_dir):
    root, _, files, labels = extracted
    ref = reference_vae(tiny_vae_dir)
    shards = sorted((root / "shards").glob("shard_*.npz"))
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert (root / "shards" / "classes.txt").read_text() == "a_cls\nb_cls\n"
    latents, got_labels = data.load_latents(root / "shards")
    assert latents.shape == (10, 4, 8, 8) and latents.dtype == np.float32
    np.testing.assert_array_equal(got_labels, np.repeat(labels, 2))
    for i, path in enumerate(files):
        with Image.open(path) as image:
            arr = data.center_crop_arr(image.convert("RGB"), IMAGE_SIZE)
        x = torch.from_numpy(np.stack([arr, arr[:, ::-1]]).astype(np.float32)).permute(0, 3, 1, 2) \
            / 127.5 - 1
        with torch.no_grad():
            expected = ref.encode(x).latent_dist.mean * SCALE  # image i, then its mirror image
        torch.testing.assert_close(torch.from_numpy(latents[2 * i:2 * i + 2]), expected,
                                   rtol=1e-4, atol=1e-5)
    merged, merged_labels = data.load_latents(root / "all.npy")
    np.testing.assert_array_equal(merged, latents)
    np.testing.assert_array_equal(merged_labels, got_labels)


def test_extraction_resumes_by_skipping_finished_shards(extracted):
    root, argv, _, _ = extracted
    shards = sorted((root / "shards").glob("shard_*.npz"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    extract_latents.main(argv)
    for p in shards:
        assert p.read_bytes() == before[p.name][1]
        if p != shards[1]:
            assert p.stat().st_mtime_ns == before[p.name][0]  # not rewritten
    assert not list((root / "shards").glob(".*tmp*"))


def test_extraction_errors(tmp_path):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            extract_latents.main(["--out", str(tmp_path / "o"), *argv])
        return str(e.value)

    assert error("--data-path", str(tmp_path / "missing"), "--image-size", "64") == \
        f"error: --data-path {tmp_path / 'missing'}: no such directory"
    assert error("--data-path", str(tmp_path), "--image-size", "60") \
        == "error: --image-size must be a multiple of 8, got 60"
    assert error("--data-path", str(tmp_path), "--image-size", "0") \
        == "error: argument --image-size: must be an integer >= 8, got 0"
    (tmp_path / "empty_class").mkdir()
    assert error("--data-path", str(tmp_path), "--image-size", "64").startswith("error: no images")


# ----------------------------------------------------------------------------------------------
# End to end

def test_extraction_training_sampling_decoding(extracted, tiny_vae_dir, tmp_path):
    import train
    root, _, _, _ = extracted
    threads = torch.get_num_threads()
    try:
        train.main(["--variant", "s", "--arch", "widths=32,16", "depths=2,2", "num_heads=2",
                    "--data", str(root / "shards"), "--num-classes", "2", "--batch-size", "4",
                    "--steps", "2", "--sample-every", "0", "--results-dir", str(tmp_path / "runs"),
                    "--vae", str(tiny_vae_dir), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # train.py sets it for the whole process
    ckpt = sorted((tmp_path / "runs").glob("*/checkpoints/ckpt_*.pt"))[-1]
    model, _ = checkpoints.load_model(ckpt)
    assert (model.config.in_channels, model.config.input_size, model.config.num_classes) \
        == (4, 8, 2)
    sample.main([str(ckpt), "--out", str(tmp_path / "s"), "--num-images", "3", "--classes", "0,1",
                 "--seed", "5", "--steps", "3", "--vae", str(tiny_vae_dir)])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 0])
    z = sample.generate(model, [0, 1, 0], [5, 6, 7], steps=3)               # (3, 4, 8, 8) latents
    with torch.no_grad():
        x = reference_vae(tiny_vae_dir).decode(z / SCALE).sample.numpy().astype(np.float64)
    expected = np.clip(np.floor(127.5 * x + 128.0), 0, 255).transpose(0, 2, 3, 1)
    assert np.abs(images - expected).max() <= 1 and (images == expected).mean() > 0.99


def test_release_checkpoint_converts_and_samples_with_no_further_flags(tmp_path, tiny_vae_dir):
    """A release-format state_dict (the authors' key names) of a tiny latent DiMR -> convert ->
    sample, against the plain re-statement of the release's forward pass with guidance written
    out here."""
    g = torch.Generator().manual_seed(0)
    sd = release_state_dict(in_ch=4, num_classes=3, patch=2, grid=4, blocks=(3, 3), widths=(32, 16),
                            dtype=torch.float32, generator=g)
    torch.save(sd, tmp_path / "release.pth")
    convert.main([str(tmp_path / "release.pth"), str(tmp_path / "ours.pt"), "--heads", "2"])
    sample.main([str(tmp_path / "ours.pt"), "--out", str(tmp_path / "s"), "--num-images", "2",
                 "--classes", "2,0", "--seed", "11", "--steps", "3", "--vae", str(tiny_vae_dir),
                 "--no-png"])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        images = f["arr_0"]
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)

    s, y = 0.4, torch.tensor([2, 0])  # the release's guidance, its null class is 3

    def eps_fn(x, n):
        eps_c = release_forward(sd, x, n, y, heads=2)[-1]
        eps_u = release_forward(sd, x, n, torch.full_like(y, 3), heads=2)[-1]
        return eps_c + s * (eps_c - eps_u)

    x_T = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))
                       for seed in (11, 12)])
    with torch.no_grad():
        z = ode_sample(eps_fn, x_T, 3)
        x = reference_vae(tiny_vae_dir).decode(z / SCALE).sample.numpy().astype(np.float64)
    expected = np.clip(np.floor(127.5 * x + 128.0), 0, 255).transpose(0, 2, 3, 1)
    assert np.abs(images - expected).max() <= 1 and (images == expected).mean() > 0.99


@pytest.mark.parametrize("variant,pixels", [("xl", 256), ("g", 256), ("xl_3r", 512)])
def test_latent_variants_sample_at_their_resolution_from_the_checkpoint_alone(
        variant, pixels, tmp_path, tiny_vae_dir):
    """The paper's latent variants with their input size, patch and classes (narrow and shallow
    here): sample.py takes resolution, channels and decoding from the checkpoint's config."""
    narrow = dict(widths=(32, 16, 8)[:len(dimr.get_config(variant).widths)], num_heads=2)
    model = dimr.DiMR(dimr.get_config(variant, depths=(1,) * len(narrow["widths"]), **narrow))
    sd = model.state_dict()
    checkpoints.save({"config": dataclasses.asdict(model.config), "model": sd, "ema": sd},
                     tmp_path / "c.pt")
    sample.main([str(tmp_path / "c.pt"), "--out", str(tmp_path / "s"), "--num-images", "1",
                 "--steps", "3", "--vae", str(tiny_vae_dir), "--no-png"])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (1, pixels, pixels, 3) and f["labels"].max() < 1000
