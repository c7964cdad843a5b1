"""torch.distributed helpers that behave the same under torchrun and as a plain `python x.py`.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (also across nodes);
without them we run as a single process and every collective below is a no-op.
Backend: NCCL on CUDA, gloo on CPU. The collective timeout is an hour, not NCCL's 10 minutes:
rank 0 alone writes multi-GB checkpoints and sample files while the other ranks wait for it.

Threads, one rule for every entry point (`set_threads`): --threads N if given, else torch's
default, which is OMP_NUM_THREADS where it is set (torchrun sets 1 per process) and the number of
cores otherwise. Never the machine's momentary load: a float sum split over another number of
threads rounds differently, so a run resumed with another count drifts in the last digits.
"""
import datetime
import multiprocessing
import os
import signal
import sys

import torch
import torch.distributed as dist


TIMEOUT = datetime.timedelta(hours=1)


def init():
    """Join the process group if launched by torchrun; return the device this rank uses."""
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl", timeout=TIMEOUT,
                                    device_id=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))


def set_threads(threads=None):
    """--threads, or torch's default (see above); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(x):
    """Average a tensor over ranks (returns a new tensor; identity on one process)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def gather_rows(x):
    """Concatenate every rank's rows (N_r, ...) in rank order; the ranks may hold different N_r.

    All ranks get the result (an all_gather of padded tensors: NCCL and gloo both support it)."""
    if not dist.is_initialized():
        return x
    sizes = torch.zeros(world_size(), dtype=torch.long, device=x.device)
    sizes[rank()] = len(x)
    dist.all_reduce(sizes)
    padded = x.new_zeros((int(sizes.max()), *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes.tolist())])


def run_main(fn):
    """Run an entry point's work: errors a user can act on (bad input, missing files, a full disk,
    NaN) end it with one line `error: ...` and exit status 1. Under torchrun every process that
    meets one prints it, `error (rank R): ...`, as some are one process's alone (a bad file in its
    share of the data); a process whose peer died first (a collective fails) exits with one line
    from rank 0, without a traceback of its own."""
    try:
        fn()
        shutdown(wait=True)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        where = f" (rank {rank()})" if world_size() > 1 else ""
        stop_children()
        shutdown()
        sys.exit(f"error{where}: {e}")
    except dist.DistError as e:
        prints = is_main()
        stop_children()
        shutdown()
        sys.exit(f"error: another process failed, see its message ({str(e).splitlines()[0]})"
                 if prints else 1)


def broadcast_from_main(value):
    """Rank 0's value on every process (itself without torchrun)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_from_main(message):
    """Rank 0's error message (None: none) ends every process: rank 0 raises it as a ValueError
    (run_main prints it, one line), the others exit as when a peer has failed, quietly."""
    message = broadcast_from_main(message)
    if message:
        raise ValueError(message) if is_main() else dist.DistError(message)


def stop_children():
    """Kill this process's worker processes before an error ends it: DataLoader workers ignore
    SIGTERM (train.py leaves preemption to the trainer), so the interpreter's exit, which
    terminates and then joins them, would wait forever for one that is not idle. torch's SIGCHLD
    handler, which reports a worker's death as an error of its own, is reset first."""
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


def shutdown(wait=False):
    """Leave the process group. wait=True (a run that finished normally) first waits for every rank:
    a rank that tears down its connections while rank 0 still writes files crashes gloo
    ("terminate called without an active exception"). On an error, leave at once: the others may
    never reach a barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
