"""One tiny trained run shared by the tool tests (predict, plot_logs, export_onnx)."""
from runner import run_main

_RUNS = {}  # dataset folder -> run folder


def trained_run_dir(data, tmp_path_factory):
    """A 1-epoch run with --save_results (checkpoint.pth, log.txt, eval/results0000.json, config_args_all.json):
    trained on first use, then shared by every test module of the session."""
    if data not in _RUNS:
        out = tmp_path_factory.mktemp("trained") / "run"
        run_main(data, out, "--save_results", options=["epochs=1"])
        _RUNS[data] = out
    return _RUNS[data]
