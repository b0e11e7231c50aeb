"""One tiny trained run shared by the tool tests (predict, plot_logs, export_onnx): train it once per session."""
import pytest

from runner import run_main

_RUNS = {}


@pytest.fixture(scope="session")
def trained_run(data, tmp_path_factory):
    """A 1-epoch run with --save_results: checkpoint.pth, log.txt, eval/results0000.json, config_args_all.json.
    Each test module imports this fixture (pytest makes one per module), so the run itself is memoised."""
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("trained") / "run"
        run_main(data, out, "--save_results", options=["epochs=1"])
        _RUNS["run"] = out
    return _RUNS["run"]
