"""What train.py says before its first step (support/plan.py), each number against the tensors and
files themselves: the memory of each process, the size of a checkpoint (the file written, at any
step, with --plan's FakeTensors too), the most the run holds on disk, the free space that stops a
run before its first step; AdamW's state created before the first step trains bit for bit as
torch's lazy one; the log's peak memory against the kernel's count."""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import diffusion
import dimr
import sample
import train
from support import checkpoints, plan as plan_lib
from util import free_port, mount_tmpfs

TINY = ["--arch", "widths=32,16", "depths=2,2", "num_heads=2"]
QUIET = ["--sample-every", "0", "--eval-images", "0", "--log-every", "1", "--threads", "1"]
TINY_CONFIG = dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2)
CPU = torch.device("cpu")


def batches(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[train.Batch(torch.randn(8, 1, 8, 8, generator=g),
                         torch.randint(0, 10, (8,), generator=g),
                         torch.randint(1, 1001, (8,), generator=g),
                         torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, generator=g) < 0.1)]
            for _ in range(k)]


def trained_state(cfg, steps=3, lazy=False):
    """train.new_state after `steps` steps; lazy: AdamW's state left to its first step."""
    state = train.new_state(TINY_CONFIG, cfg, CPU, "fp32")
    if lazy:
        state.optimizer.state.clear()
    for b in batches(steps):
        train.train_step(state.model, state, b, diffusion.DiscreteSchedule(), cfg, None)
    return state


def test_adamw_state_made_before_the_first_step_trains_as_torchs_lazy_one(single_thread):
    """Weights, EMA and every AdamW state tensor (values, dtype, device, strides) after 3 steps."""
    cfg = replace(train.DEMO, warmup=0, lr=1e-2)  # weight decay 0.03 on, large steps
    eager, lazy = trained_state(cfg), trained_state(cfg, lazy=True)
    for a, b in [(eager.model, lazy.model), (eager.ema, lazy.ema)]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    a, b = eager.optimizer.state_dict()["state"], lazy.optimizer.state_dict()["state"]
    assert len(a) == len(b) == len(list(eager.model.parameters()))
    for i in a:
        assert list(a[i]) == list(b[i]) == ["step", "exp_avg", "exp_avg_sq"]
        for k in a[i]:
            x, y = a[i][k], b[i][k]
            assert (x.dtype, x.device, x.stride()) == (y.dtype, y.device, y.stride())
            assert torch.equal(x, y)
    assert a[0]["step"].item() == 3.0
    start = train.new_state(TINY_CONFIG, cfg, CPU, "fp32").model
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), eager.model.parameters()))


def numbers(text):
    """The plan's lines -> {what: bytes}."""
    memory = re.search(r"plan, per process: (.*) = ([\d,]+) bytes", text)
    found = {what.strip(): int(n.replace(",", "")) for what, n in
             re.findall(r"([A-Za-z' ]+?) ([\d,]+)(?: \+|$)", memory.group(1))}
    found["one checkpoint"] = int(re.search(r"one checkpoint ([\d,]+) bytes", text)
                                  .group(1).replace(",", ""))
    return found


def test_the_plan_is_what_the_run_holds(tmp_path, capsys, single_thread):
    """The numbers printed before the first step against the run's own tensors, computed here
    apart: weights 4 bytes a parameter of a fresh DiMR, gradients the bytes of a backward pass's
    .grad, AdamW's state the bytes of torch's lazily created one, the EMA a copy of the weights,
    and one checkpoint the size of the file the run wrote. `--plan 1` (FakeTensors) prints the
    same; `--plan 2` adds DDP's buckets, one more copy of the gradients."""
    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "1"])
    printed = numbers(capsys.readouterr().out)
    ckpt_file = tmp_path / "000-DiMR-S-2R" / "checkpoints" / "ckpt_0000001.pt"

    lazy = trained_state(train.DEMO, steps=1, lazy=True)
    model = dimr.DiMR(TINY_CONFIG)
    loss = sum(p.float().sum() for p in model(torch.randn(2, 1, 8, 8), torch.tensor([1., 2.]),
                                              torch.tensor([0, 1])))
    loss.backward()
    weights = 4 * sum(p.numel() for p in model.parameters())
    assert printed == {"weights": weights,
                       "gradients": sum(p.grad.nbytes for p in model.parameters()),
                       "AdamW state": sum(v.nbytes for s in lazy.optimizer.state.values()
                                          for v in s.values()),
                       "EMA": weights, "one checkpoint": ckpt_file.stat().st_size}

    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "1", "--plan", "1"])
    assert numbers(capsys.readouterr().out) == printed
    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "1", "--plan", "2",
                "--batch-size", "64"])
    out = capsys.readouterr().out
    assert numbers(out) == {**printed, "DDP's gradient buckets": printed["gradients"]}
    assert "batch 64 = 2 process(es) x 32 x 1 accumulation step(s)" in out
    assert len(list(tmp_path.iterdir())) == 1  # --plan made no run folder


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_checkpoint_size_is_exact_at_any_step(tmp_path, precision, single_thread):
    """saved_bytes of the checkpoint dict against checkpoints.save's file, at steps whose number
    pickles into 1, 2 and 4 bytes; the plan's count (the last step, with fp16 the GradScaler's
    largest count) is the file at the last step, no less than at any earlier one; FakeTensors
    count as real tensors."""
    cfg = replace(train.DEMO, autocast=precision, steps=70_000)
    state = train.new_state(TINY_CONFIG, cfg, CPU, precision)
    for b in batches(2):
        train.train_step(state.model, state, b, diffusion.DiscreteSchedule(), cfg,
                         sample.AUTOCAST[precision])
    sizes = {}
    for step in (1, 255, 256, 70_000):
        if step == 70_000 and precision == "fp16":
            state.scaler._growth_tracker.fill_(1999)  # the most it counts to
        ckpt = {**train.checkpoint_of(TINY_CONFIG, cfg, state), "step": step}
        checkpoints.save(ckpt, tmp_path / f"{step}.pt")
        sizes[step] = (tmp_path / f"{step}.pt").stat().st_size
        assert plan_lib.saved_bytes(ckpt) == sizes[step]
    lines, _, _ = train.plan(state, cfg, TINY_CONFIG, 1)
    assert numbers("\n".join(lines))["one checkpoint"] == sizes[70_000] == max(sizes.values())
    fake = train.new_state(TINY_CONFIG, cfg, CPU, precision, fake=True)
    real = train.new_state(TINY_CONFIG, cfg, CPU, precision)
    assert type(fake.model.class_embed.weight).__name__ == "FakeTensor"
    assert plan_lib.saved_bytes(train.checkpoint_of(TINY_CONFIG, cfg, fake)) \
        == plan_lib.saved_bytes(train.checkpoint_of(TINY_CONFIG, cfg, real))


def test_the_most_the_run_holds_on_disk(tmp_path, capsys):
    """At most --keep checkpoints, the best-FID one and the one being written, never more than the
    run writes; the grids at most the PNG of noise: against the files of a run with grids."""
    cfg = SimpleNamespace(keep=3, fid_every=0, steps=1000, ckpt_every=100)
    assert plan_lib.checkpoints_held(cfg) == 4
    assert plan_lib.checkpoints_held(replace_ns(cfg, fid_every=100)) == 5
    assert plan_lib.checkpoints_held(replace_ns(cfg, steps=250)) == 3   # writes 100, 200, 250
    lines, error, warning = plan_lib.describe([("weights", 10)], 1000, replace_ns(cfg, keep=1),
                                              (7, 30), tmp_path)
    assert "at most 2 at once (--keep 1, the one being written) and 7 sample grids of at most 30 " \
           "bytes: 2.21 kB" in lines[1] and error is warning is None

    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "4", "--sample-every",
                "2", "--sample-steps", "3"])
    out = capsys.readouterr().out
    bound = int(re.search(r"2 sample grids of at most ([\d,]+) bytes", out)[1].replace(",", ""))
    grids = sorted((tmp_path / "000-DiMR-S-2R" / "samples").glob("step_*.png"))
    assert len(grids) == 2 and all(g.stat().st_size <= bound for g in grids)


def replace_ns(ns, **changes):
    return SimpleNamespace(**{**vars(ns), **changes})


def test_a_disk_that_cannot_hold_one_checkpoint_stops_the_run_before_its_first_step(tmp_path,
                                                                                   capsys):
    """A 1 MiB tmpfs and a checkpoint of 1.08 MB: one line with both numbers, nothing written."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "1m", "test_a_small_disk_...")
    try:
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, *QUIET, "--results-dir", str(disk), "--steps", "1"])
        ckpt = numbers_of_plan(tmp_path, capsys)
        assert str(e.value.code) == (f"error: {disk} has 1,048,576 bytes free, less than one "
                                     f"checkpoint ({ckpt:,} bytes): free some space or give "
                                     "another --results-dir")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_under_torchrun_rank_0_stops_every_process_with_one_line(tmp_path, capsys):
    """2 processes, the 1 MiB tmpfs: rank 0 decides for all; one error line, every process ends."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "1m", "test_a_small_disk_...")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             "--master_addr=127.0.0.1", f"--master_port={free_port()}",
             str(Path(train.__file__)), *TINY, *QUIET, "--steps", "1", "--batch-size", "8",
             "--results-dir", str(disk)],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        ckpt = numbers_of_plan(tmp_path, capsys)
        assert proc.returncode != 0 and [line for line in proc.stderr.splitlines()
                                         if line.startswith("error")] == [
            f"error (rank 0): {disk} has 1,048,576 bytes free, less than one checkpoint "
            f"({ckpt:,} bytes): free some space or give another --results-dir"]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def numbers_of_plan(tmp_path, capsys):
    """One checkpoint's bytes, from --plan on a disk with room."""
    capsys.readouterr()
    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "1", "--plan", "1"])
    return numbers(capsys.readouterr().out)["one checkpoint"]


def test_a_small_disk_stops_or_warns_by_the_free_space(tmp_path, capsys, monkeypatch):
    """The free space injected: one byte short of a checkpoint stops the run; room for one but not
    for the 4 (--keep 3 and the one being written) warns and trains."""
    ckpt = numbers_of_plan(tmp_path, capsys)
    usage = shutil.disk_usage
    free = [ckpt - 1]
    monkeypatch.setattr(plan_lib.shutil, "disk_usage",
                        lambda path: usage(path)._replace(free=free[0]))
    args = [*TINY, *QUIET, "--results-dir", str(tmp_path / "runs"), "--steps", "8",
            "--ckpt-every", "2"]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert str(e.value.code) == (f"error: {tmp_path / 'runs'} has {ckpt - 1:,} bytes free, less "
                                 f"than one checkpoint ({ckpt:,} bytes): free some space or give "
                                 "another --results-dir")
    assert not (tmp_path / "runs").exists()
    free[0] = 3 * ckpt
    train.main(args)
    err = capsys.readouterr().err
    assert (f"warning: {tmp_path / 'runs'} has {plan_lib.size(3 * ckpt)} free, less than the "
            f"{plan_lib.size(4 * ckpt)} more that the run will hold at most") in err
    assert len(list((tmp_path / "runs" / "000-DiMR-S-2R" / "checkpoints").iterdir())) == 3


def vm_hwm():
    """The kernel's peak resident size of this process, bytes (/proc/self/status)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def test_the_log_carries_the_peak_memory(tmp_path, capsys):
    """On the CPU the peak resident size: between the kernel's peak before the run and after it
    (/proc's VmHWM, which reads the kernel's lazily summed counters a little differently from
    getrusage: within 1%), in stats.jsonl and in the log line."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc/self/status to compare with")
    before = vm_hwm()
    train.main([*TINY, *QUIET, "--results-dir", str(tmp_path), "--steps", "2"])
    after = vm_hwm()
    stats = [json.loads(s) for s in (tmp_path / "000-DiMR-S-2R" / "stats.jsonl").read_text()
             .splitlines()]
    assert all(0.99 * before <= s["peak_memory"] <= 1.01 * after for s in stats)
    assert f"peak {plan_lib.size(stats[-1]['peak_memory'])}  ETA" in capsys.readouterr().out
