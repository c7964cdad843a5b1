"""Helpers shared by several test files (imported as `from util import ...`: tests/ is on sys.path)."""
import socket


def free_port():
    """A TCP port on 127.0.0.1 that is free now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
