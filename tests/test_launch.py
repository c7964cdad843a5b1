"""The user's commands as launched: ImageNet 64 at full DiMR-M/3R size through
`tools/imagenet64.py`, `torchrun train.py`, `--resume` and `sample.py`; and training on 2 nodes
(two torchrun launchers on one machine) equal to 2 processes on one node and to one process.

The full-size test holds two M/3R checkpoints (2.1 GB each) in pytest's tmp_path and deletes them
at the end; docs/launch.md has its cost."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dimr
from util import free_port

ROOT = Path(__file__).resolve().parents[1]
M3R_PARAMETERS = 132_828_681          # the paper's count for DiMR-M/3R
S = 64
# one thread per process, as torchrun sets it; a crash in C++ (SIGABRT, SIGSEGV) prints the Python
# stack where it happened
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")


def tail(text, n=3000):
    return text[-n:] if text.strip() else "(nothing)"


def run_together(commands, timeout):
    """Start the commands (argument lists for Python) together from the project's root, each in a
    process group of its own, their output in files; wait for all. On a timeout, or once one has
    failed (its peers would wait for it), the others' groups are killed (torchrun's workers too)
    and the test fails, showing each command's exit status and the tails of its stdout and
    stderr. Returns the stdouts."""
    procs, files, timed_out = [], [], False
    for cmd in commands:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=out, stderr=err,
                                      text=True, env=ENV, start_new_session=True))
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        timed_out = time.monotonic() > deadline
        if timed_out or any(proc.poll() for proc in procs):  # one failed: the others would wait
            break
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    outputs = []
    for pair in files:
        for f in pair:
            f.seek(0)
        outputs.append(tuple(f.read() for f in pair))
        for f in pair:
            f.close()
    report = "".join(f"\n[{k}] python {' '.join(cmd)}\nexit {proc.returncode}\nstdout: "
                     f"{tail(o, 2000)}\nstderr: {tail(e, 3000)}"
                     for k, (cmd, proc, (o, e)) in enumerate(zip(commands, procs, outputs)))
    if timed_out:
        pytest.fail(f"timed out after {timeout} s:{report}")
    assert all(proc.returncode == 0 for proc in procs), report
    return [o for o, _ in outputs]


def launch(argv, timeout):
    """One command (single-threaded per process, as torchrun sets it); its stdout."""
    return run_together([argv], timeout)[0]


def torchrun(*argv, nproc=2):
    """`torchrun --nproc_per_node=N ...` on one node (static rendezvous on 127.0.0.1)."""
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *argv]


def load(path):
    """A checkpoint memory-mapped: its tensors are read from the file as they are used."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def stats(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# ImageNet 64 at full DiMR-M/3R size: convert, train on 2 processes, resume, sample

def write_downsampled_imagenet(root, rng):
    """Two files in the download's format: `data` uint8 [N, 3*64*64] (each row the R, G, B planes
    of one image), `labels` 1..1000. Returns the images as (N, H, W, RGB) and the labels."""
    root.mkdir()
    photos, labels = [], []
    for k, n in enumerate((3, 2)):
        photo = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        label = rng.integers(1, 1001, n)
        np.savez(root / f"train_data_batch_{k + 1}.npz",
                 data=photo.transpose(0, 3, 1, 2).reshape(n, -1), labels=label,
                 mean=np.zeros(3 * S * S))
        photos.append(photo)
        labels.append(label)
    return np.concatenate(photos), np.concatenate(labels)


def test_imagenet64_at_full_m3r_size_trains_resumes_and_samples(tmp_path):
    try:
        full_size_run(tmp_path)
    finally:  # 4.2 GB of checkpoints: pytest would keep them with its last three tmp folders
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def full_size_run(tmp_path):
    photos, labels = write_downsampled_imagenet(tmp_path / "imagenet64", np.random.default_rng(0))
    npy = tmp_path / "in64.npy"
    launch(["-m", "tools.imagenet64", str(tmp_path / "imagenet64"), "--out", str(npy)], 120)
    # the pixels as the source images hold them, planes first; 0-based labels
    assert np.array_equal(np.load(npy).transpose(0, 2, 3, 1), photos)
    assert np.array_equal(np.load(tmp_path / "in64_labels.npy"), labels - 1)

    results = tmp_path / "runs"
    quiet = ["--log-every", "1", "--sample-every", "0", "--eval-images", "0", "--threads", "1"]
    out = launch(torchrun("train.py", "--variant", "m", "--data", str(npy), "--batch-size", "4",
                          "--steps", "2", "--ckpt-every", "2", *quiet,
                          "--results-dir", str(results)), 1800)
    run_dir, = results.iterdir()
    assert run_dir.name == "000-DiMR-M-3R"
    assert f"{M3R_PARAMETERS:,} parameters" in out
    assert "batch 4 = 2 process(es) x 2 x 1 accumulation step(s); 2 steps" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parameters"] == M3R_PARAMETERS and config["world_size"] == 2
    assert (config["model"]["input_size"], config["model"]["in_channels"],
            config["model"]["num_classes"]) == (64, 3, 1000)
    first = stats(run_dir)
    assert [s["step"] for s in first] == [1, 2]
    for s in first:
        # the paper's branch weights 4^-(R-1-r) over the logged per-branch terms; the release's
        # linear warm-up over 5,000 steps to lr 3e-4 (the M/3R recipe)
        assert s["loss"] == pytest.approx(np.dot([1 / 16, 1 / 4, 1], s["loss_branches"]),
                                          rel=1e-6)
        assert s["lr"] == pytest.approx(3e-4 * s["step"] / 5000, rel=1e-12)
    ckpt2_path = run_dir / "checkpoints" / "ckpt_0000002.pt"
    assert sorted(p.name for p in ckpt2_path.parent.iterdir()) == [ckpt2_path.name]
    ckpt2 = load(ckpt2_path)
    assert ckpt2["step"] == 2 and ckpt2["train_config"]["data"] == str(npy.resolve())
    assert sum(v.numel() for v in ckpt2["model"].values()) == M3R_PARAMETERS
    # AdamW with betas (0.99, 0.99) moves each weight by at most its learning rate per step
    # (|m_hat| <= sqrt(v_hat) when beta1 = beta2), plus the decay and float32 rounding; from the
    # initial weights (seed 0) over two steps at 6e-8 and 1.2e-7:
    torch.manual_seed(0)
    init = dimr.DiMR(dimr.config_from_dict(ckpt2["config"])).state_dict()
    moved = 0
    for name, start in init.items():
        delta = (ckpt2["model"][name] - start).abs()
        assert (delta <= 1.8e-7 * 1.001 + 2.5e-7 * start.abs()).all(), name
        moved += int((delta > 0).sum())
    assert moved > 0.9 * M3R_PARAMETERS
    tensors = len(init)
    del init

    out = launch(torchrun("train.py", "--resume", str(run_dir), "--steps", "3"), 1800)
    assert f"resuming {ckpt2_path} at step 2: {run_dir}" in out
    assert [p.name for p in results.iterdir()] == [run_dir.name]     # the same folder
    resumed = stats(run_dir)
    assert [s["step"] for s in resumed] == [1, 2, 3] and resumed[:2] == first
    assert resumed[2]["lr"] == pytest.approx(3e-4 * 3 / 5000, rel=1e-12)
    assert sorted(p.name for p in ckpt2_path.parent.iterdir()) \
        == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert json.loads((run_dir / "config.json").read_text())["train_config"]["steps"] == 3
    ckpt3_path = run_dir / "checkpoints" / "ckpt_0000003.pt"
    ckpt3 = load(ckpt3_path)
    assert ckpt3["step"] == 3 and ckpt3["train_config"]["steps"] == 3
    # the optimizer state continues: the same tensors per parameter, Adam's count one further
    opt2, opt3 = ckpt2["optimizer"], ckpt3["optimizer"]
    assert len(opt2["state"]) == tensors and opt2["state"].keys() == opt3["state"].keys()
    for k, state in opt2["state"].items():
        assert state.keys() == opt3["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert (state["step"].item(), opt3["state"][k]["step"].item()) == (2, 3)
        assert state["exp_avg"].shape == opt3["state"][k]["exp_avg"].shape
    assert [{k: v for k, v in g.items() if k != "lr"} for g in opt2["param_groups"]] \
        == [{k: v for k, v in g.items() if k != "lr"} for g in opt3["param_groups"]]
    del ckpt2, ckpt3, opt2, opt3

    samples = tmp_path / "samples"
    out = launch(["sample.py", str(ckpt3_path), "--num-images", "2", "--steps", "3", "--out",
                  str(samples)], 900)
    assert ("guidance s = 0 (default for DiMR-M/3R: the paper's Table 2 protocol (ImageNet 64, "
            "no guidance))") in out
    with np.load(samples / "samples.npz") as f:
        images, sample_labels = f["arr_0"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (2, S, S, 3)
    assert sample_labels.tolist() == [0, 500]       # "even": image i of 2 gets floor(i 1000 / 2)
    assert not np.array_equal(images[0], images[1])
    assert (samples / "grid.png").is_file() and len(list((samples / "images").iterdir())) == 2


# ----------------------------------------------------------------------------------------------
# Two nodes, simulated on one machine

TINY = ["--arch", "widths=32,16", "depths=2,2", "num_heads=2"]
DIGITS = ["--variant", "s", "--data", "digits", "--steps", "4", "--batch-size", "8",
          "--lr", "1e-3", "--warmup", "0", "--log-every", "1", "--ckpt-every", "2",
          "--sample-every", "0", "--eval-images", "0", "--threads", "1", *TINY]


def two_nodes(argv, rendezvous="static", node_1_argv=None, timeout=300):
    """A script from two torchrun launchers started together, --nnodes=2 --nproc_per_node=1, as
    two machines would run them (they differ in --node_rank only, and node 1 gets node_1_argv if
    given). Returns their stdouts."""
    port = free_port()
    rdzv = {"static": ["--master_addr=127.0.0.1", f"--master_port={port}"],
            "c10d": ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                     "--rdzv_id=test"]}[rendezvous]
    return run_together([["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                          "--nproc_per_node=1", *rdzv, *args]
                         for k, args in enumerate((argv, node_1_argv or argv))], timeout)


def test_two_nodes_equal_two_processes_on_one_node_and_one_process(tmp_path):
    """Global rank 0 alone writes the run folder; the nodes' two processes compute what two
    processes of one node compute (bit for bit: the same rows, the same all-reduce of two), and
    what one process computes with the whole batch (to float32 rounding), with either
    rendezvous. sample.py on the two nodes writes one process's samples.npz byte for byte."""
    one_node = tmp_path / "one_node"
    launch(torchrun("train.py", *DIGITS, "--results-dir", str(one_node)), 300)
    one_process = tmp_path / "one_process"
    launch(["train.py", *DIGITS, "--results-dir", str(one_process)], 300)
    reference, = one_node.iterdir()
    ref = load(reference / "checkpoints" / "ckpt_0000004.pt")
    single, = one_process.iterdir()
    alone = load(single / "checkpoints" / "ckpt_0000004.pt")
    torch.manual_seed(0)
    init = dimr.DiMR(dimr.config_from_dict(ref["config"])).state_dict()
    assert max((ref["model"][k] - init[k]).abs().max() for k in init) > 1e-3  # it trained
    for k in ("model", "ema"):
        assert max((ref[k][n] - alone[k][n]).abs().max() for n in ref[k]) < 1e-5
    np.testing.assert_allclose([s["loss"] for s in stats(single)],
                               [s["loss"] for s in stats(reference)], rtol=1e-5)

    for rendezvous in ("static", "c10d"):
        results, elsewhere = tmp_path / rendezvous, tmp_path / f"{rendezvous}_node_1"
        # static: global rank 0 is node 0's, so node 1's own --results-dir stays untouched
        outputs = two_nodes(["train.py", *DIGITS, "--results-dir", str(results)], rendezvous,
                            ["train.py", *DIGITS, "--results-dir", str(elsewhere)]
                            if rendezvous == "static" else None)
        assert not elsewhere.exists()
        folders = sorted(p.name for p in results.iterdir())
        assert folders == [reference.name], folders                  # one run folder
        run_dir = results / folders[0]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["world_size"] == 2 and config["micro_batch"] == 4
        # the run's lines come from the node of global rank 0 only
        assert sum("batch 8 = 2 process(es) x 4 x 1" in out for out in outputs) == 1
        logged = ("step", "loss", "loss_branches", "grad_norm")
        assert [[s[k] for k in logged] for s in stats(run_dir)] \
            == [[s[k] for k in logged] for s in stats(reference)]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) \
            == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
        for step in (2, 4):
            name = f"ckpt_{step:07d}.pt"
            a, b = load(run_dir / "checkpoints" / name), load(reference / "checkpoints" / name)
            assert a["step"] == step
            for k in ("model", "ema"):
                assert a[k].keys() == b[k].keys()
                assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), (rendezvous, step, k)
            for p, state in a["optimizer"]["state"].items():
                assert all(torch.equal(v, b["optimizer"]["state"][p][key])
                           for key, v in state.items())

    ckpt = str(reference / "checkpoints" / "ckpt_0000004.pt")
    sampling = ["--num-images", "6", "--batch-size", "2", "--steps", "3", "--no-png"]
    two_nodes(["sample.py", ckpt, *sampling, "--out", str(tmp_path / "samples_2_nodes")])
    launch(["sample.py", ckpt, *sampling, "--out", str(tmp_path / "samples_1")], 300)
    assert (tmp_path / "samples_2_nodes" / "samples.npz").read_bytes() \
        == (tmp_path / "samples_1" / "samples.npz").read_bytes()
