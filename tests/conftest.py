import os
import sys

import pytest
import torch

# Tests import the flat scripts (model.py, rollout.py, ...) from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread in this process and in the processes it starts, for the tests that compare two
    trainings bit for bit: at two threads a CPU backward can add in an order that depends on the
    machine's load (docs/results.md, "A pretrained student", counts the runs). The demo's trainers run
    one thread per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
