import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level modules


@pytest.fixture
def single_thread():
    """One intra-op thread for tests made of many tiny ops (gradcheck runs thousands): there,
    threads add only synchronisation, which turns into long waits on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
