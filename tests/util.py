"""Helpers shared by several test files (imported as `from util import ...`: tests/ is on
sys.path)."""
import socket
import subprocess

import pytest
import torch


def free_port():
    """A TCP port on 127.0.0.1 that is free now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradcheck_module(module, *inputs, pack=lambda *a: a):
    """torch.autograd.gradcheck (float64 finite differences against autograd) of
    module(*pack(*inputs)) with respect to the inputs that require grad and every parameter.
    Fast mode compares one random projection of each Jacobian (u^T J v), which any wrong
    gradient entry changes, at a few forward passes instead of one per entry."""
    names, params = zip(*[(n, p.detach().requires_grad_()) for n, p in module.named_parameters()])

    def f(*args):
        out = torch.func.functional_call(module, dict(zip(names, args[len(inputs):])),
                                         pack(*args[:len(inputs)]))
        return tuple(out) if isinstance(out, list) else out

    return torch.autograd.gradcheck(f, (*inputs, *params), fast_mode=True)


def mount_tmpfs(path, size, otherwise):
    """A real filesystem of `size` (e.g. "2m") at path, to fill; where mounting is not allowed the
    test is skipped, naming the test (`otherwise`) that covers the same path with an injected
    error."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()[:100]}); {otherwise} "
                    "injects the error instead")
