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


@pytest.fixture(scope="session")
def trained_run(data, tmp_path_factory):
    """One tiny 1-epoch run with --save_results (checkpoint.pth, log.txt, eval/results0000.json,
    config_args_all.json), shared by the tool tests."""
    from runner import run_main

    out = tmp_path_factory.mktemp("trained") / "run"
    run_main(data, out, "--save_results", options=["epochs=1"])
    return out
