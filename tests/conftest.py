import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Where the tiny synthetic dataset goes; the first main.py run generates it, the others reuse it."""
    return tmp_path_factory.mktemp("data") / "synthetic"
