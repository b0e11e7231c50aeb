"""`python -m tools.benchmark` as a user runs it, on a tiny model: every row measured, comparisons in the same run."""
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from main import parse_args
from models import build_model
from tests.runner import ROOT, TINY_OPTIONS
from tools.benchmark.demo import best_ap, demo_summary, schedule, time_to_ap
from tools.benchmark.workloads import KernelTimes
from util.run_dir import read_log

MODEL_OPTIONS = ["hidden_dim=32", "nheads=4", "dim_feedforward=64", "enc_layers=1", "dec_layers=2", "num_queries=20",
                 "dn_number=6"]


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.benchmark", *args], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


def table_rows(stdout: str) -> dict:
    """{what: [the other cells]} of every markdown row that is not a header or a separator."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("what", "repeat") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def git_worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_tool("-c", "config/DINO/DINO_demo.py", "--size", "64", "64", "--batch", "2", "--runs", "2",
                    "--threads", "1", "--options", *MODEL_OPTIONS, "--against", "HEAD", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_every_row_has_numbers_and_the_json_has_them_all(report):
    proc, results = report
    rows = table_rows(proc.stdout)
    assert len(rows) == len(results["rows"]) == 44
    for key, row in results["rows"].items():
        cells = rows[row["what"]]
        assert number(cells[0]) == pytest.approx(row["median"], rel=1e-3, abs=1e-9), key
        if "min" in row:
            low, high = (number(x) for x in re.fullmatch(r"([\d.,e+-]+?)-([\d.,e+-]+)", cells[1]).groups())
            assert low <= number(cells[0]) <= high, key
            assert len(row["samples"]) == 2
    for phase in ("eval", "train", "core"):  # our timings against the machine's matmul rate
        assert 0 < results["rows"][phase]["of_matmul"] < 1
        assert rows[results["rows"][phase]["what"]][4].endswith("%")
    progress = [line for line in proc.stderr.splitlines() if line.startswith("benchmark: ")]
    assert len(progress) >= 10


def test_parameters_and_flops(report):
    _, results = report
    rows = results["rows"]
    model, _, _ = build_model(parse_args(["-c", "config/DINO/DINO_demo.py", "--device", "cpu",
                                          "--options", *MODEL_OPTIONS]))
    assert rows["parameters_total"]["median"] == sum(p.numel() for p in model.parameters())
    assert rows["parameters_trainable"]["median"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # deformable sampling, 9 FLOPs per (query, head, level, point, channel): the encoder's 8x8+4x4+2x2+1x1
    # queries in 1 layer with 2 points, 20 decoder queries in 2 layers with 4 points; 4 heads x 4 levels x 8 channels
    assert rows["gflops_sampling"]["median"] * 1e9 == pytest.approx(9 * (85 * 2 + 2 * 20 * 4) * 4 * 4 * 8)
    assert rows["gflops_counted"]["median"] > 0.1  # ResNet-18 alone is ~0.15 GFLOPs at 64x64
    assert rows["gflops_eval"]["median"] == pytest.approx(rows["gflops_counted"]["median"]
                                                          + rows["gflops_sampling"]["median"])
    assert 2 * rows["gflops_eval"]["median"] < rows["gflops_train"]["median"] < 4 * rows["gflops_eval"]["median"]


def test_reference_core_comparisons_are_paired_rounds(report):
    _, results = report
    rows = results["rows"]
    # as close to the exact (float64) results as the official float32 formula is
    assert 0 < rows["core_error"]["median"] <= 1.5 * rows["core_reference_error"]["median"] + 1e-6
    for ours, baseline, ratio in (("eval", "eval_reference_core", "eval_ratio_reference_core"),
                                  ("train", "train_reference_core", "train_ratio_reference_core"),
                                  ("core", "core_reference", "core_ratio"),
                                  ("eval_ours_worker", "eval_against", "eval_ratio_against"),
                                  ("train_ours_worker", "train_against", "train_ratio_against"),
                                  ("eval_bf16", "eval", "eval_ratio_bf16"),
                                  ("train_bf16", "train", "train_ratio_bf16"),
                                  ("train_nondeterministic", "train", "train_ratio_deterministic"),
                                  ("eval_bf16_worker", "eval_against", "eval_ratio_against_bf16"),
                                  ("train_bf16_worker", "train_against", "train_ratio_against_bf16")):
        per_round = [b / o for b, o in zip(rows[baseline]["samples"], rows[ours]["samples"])]
        assert rows[ratio]["median"] == pytest.approx(statistics.median(per_round))
        assert rows[ratio]["min"] == pytest.approx(min(per_round))
    for phase in ("eval", "train"):
        assert rows[f"peak_memory_{phase}"]["median"] >= 0
        assert "RSS" in rows[f"peak_memory_{phase}"]["unit"]


def test_against_a_revision_times_both_sides_in_a_removed_worktree(report):
    proc, results = report
    against = results["setup"]["against"]
    assert against["rev"] == "HEAD" and len(against["commit"]) == 40
    assert not os.path.exists(against["worktree"]) and against["worktree"] not in git_worktrees()
    rows = table_rows(proc.stdout)
    for what in ("eval forward, HEAD", "training step, HEAD", "eval forward, ours (worker)"):
        assert number(rows[what][0]) > 0
    assert number(rows["training step: HEAD time / ours"][0]) > 0


def test_kernel_times_split_a_step_into_library_kernels_and_the_rest(report):
    _, results = report
    rows = results["rows"]
    groups = [rows[f"train_kernel_{group}"]["samples"] for group in ("matmul", "conv", "sdpa")]
    assert all(t > 0 for samples in groups for t in samples)  # the tiny DINO runs all three kinds of kernel
    assert rows["train_kernels"]["samples"] == pytest.approx([sum(round_) for round_ in zip(*groups)])
    assert rows["train_kernel_other"]["median"] > 0
    # a step takes longer than a part of its ops
    assert rows["train_ratio_kernels"]["min"] > 1
    assert rows["train_ratio_against_kernels"]["median"] == pytest.approx(
        rows["train_against"]["median"] / rows["train_kernels"]["median"])


def test_kernel_times_group_ops_by_kernel():
    a = torch.randn(64, 64)
    with KernelTimes() as timed:
        a @ a
    assert timed.seconds["matmul"] > 0 and timed.seconds["conv"] == timed.seconds["other"] == 0
    with KernelTimes() as timed:
        torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 3, 3))
        a.to_sparse_csr() @ a  # a sparse product is not a dense kernel
        a.relu()
    assert timed.seconds["conv"] > 0 and timed.seconds["other"] > 0 and timed.seconds["matmul"] == 0


def test_user_errors_are_one_line():
    for args, message in ((["--against", "no-such-revision"], "--against no-such-revision: not a commit"),
                          (["--options", "hidden_dimm=32"], "did you mean 'hidden_dim'")):
        proc = run_tool("-c", "config/DINO/DINO_demo.py", "--size", "64", "64", *args)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_demo_times_each_revision_to_the_target_aps(tmp_path):
    options = TINY_OPTIONS + ["epochs=1"]
    proc = run_tool("--demo", "--against", "HEAD", "--repeats", "1", "--threads", "1", "--targets", "0.0", "0.99",
                    "--coco_path", str(tmp_path / "data"), "--json", str(tmp_path / "demo.json"),
                    "--demo_options", *options)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = json.loads((tmp_path / "demo.json").read_text())["demo"]
    assert [r["revision"] for r in demo["runs"]] == ["ours", "HEAD"]
    assert demo["cpu"]["bfloat16"] in ("native", "emulated") and demo["cpu"]["capability"] in proc.stdout
    assert f"bfloat16 {demo['cpu']['bfloat16']} (" in proc.stdout  # the row names the kind of CPU
    rows = table_rows(proc.stdout)
    for run in demo["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [0]
        reached = run["time_to_ap"]["0.0"]
        assert 0 < reached <= run["wall_s"] and run["time_to_ap"]["0.99"] is None
    assert rows["time to AP 0.99, s"] == ["not reached (1 of 1 runs)"] * 2
    assert all(number(cell.split(" ")[0]) > 0 for cell in rows["time to AP 0.0, s"])
    assert "worktree" in proc.stderr and "removed" in proc.stderr
    assert "/benchmark-" not in git_worktrees()


def test_demo_pieces(tmp_path):
    assert schedule(["ours", "c89fd32"], 3) == [(0, "ours"), (0, "c89fd32"), (1, "c89fd32"), (1, "ours"),
                                                (2, "ours"), (2, "c89fd32")]
    epochs = [{"ap": 0.3, "seen_s": 100.0}, {"ap": 0.55, "seen_s": 180.0}, {"ap": 0.52, "seen_s": 260.0},
              {"ap": 0.7, "seen_s": 340.0}]
    assert time_to_ap(epochs, 0.5) == 180.0 and time_to_ap(epochs, 0.65) == 340.0
    assert time_to_ap(epochs, 0.8) is None
    assert best_ap({"test_coco_eval_bbox": [0.4, 0.6]}) == 0.4
    assert best_ap({"test_coco_eval_bbox": [0.4, 0.6], "ema_test_coco_eval_bbox": [0.45, 0.5]}) == 0.45
    assert best_ap({"test_coco_eval_bbox": [0.4, 0.6], "ema_test_coco_eval_bbox": [0.35, 0.7]}) == 0.4
    assert demo_summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}
    assert demo_summary([3.0, None]) == {"not_reached": 1, "runs": 2}
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # the demo's reader: the last line is still being written
    assert read_log(str(tmp_path)) == [{"epoch": 0}, {"epoch": 1}]
    assert read_log(str(tmp_path / "missing")) == []
