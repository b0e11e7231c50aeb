"""python -m tools.chaos, reduced: a few kills of the tiny DINO on one process and under torchrun, each rerun must
continue, and the run must end exactly where an uninterrupted one ends."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from runner import ROOT, TINY_OPTIONS, read_log
from tools.chaos.__main__ import main as chaos_main
from tools.chaos.checks import differences
from tools.chaos.series import Board
from checkpoint.format import atomic_save

SCOREBOARD = re.compile(r"kills survived (\d+)/(\d+), resume failures (\d+), corrupt files (\d+), "
                        r"bit flips caught (\d+)/(\d+), final state identical: (yes|no)")


def run_chaos(data, workdir, *tool_args, main_args=()):
    cmd = [sys.executable, "-m", "tools.chaos", *tool_args, "--workdir", str(workdir),
           "-c", "config/DINO/DINO_demo.py", "--coco_path", str(data), "--num_workers", "0", *main_args,
           "--options", *TINY_OPTIONS, "save_every_iters=2"]
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def scoreboard(proc) -> dict:
    match = SCOREBOARD.fullmatch(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-4000:]
    names = ("survived", "landed", "failures", "corrupt", "caught", "flips", "identical")
    return {name: value if name == "identical" else int(value) for name, value in zip(names, match.groups())}


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chaos")
    return workdir, run_chaos(data, workdir, "--kills", "3", "--seed", "1")


def test_one_process_survives_kills_in_training_saves_and_evaluation(one_process):
    workdir, proc = one_process
    board = scoreboard(proc)
    assert (board["survived"], board["landed"], board["failures"], board["corrupt"], board["flips"]) == \
        (3, 3, 0, 0, 1), proc.stdout
    kills = [line for line in proc.stdout.splitlines() if "| kill " in line]
    assert len(kills) == 3 and "FAILED" not in proc.stdout, proc.stdout
    # seed 1 draws every kind of kill: both signals, in a save, in evaluation, to the group, with workers
    for kind in ("SIGKILL", "SIGTERM", "in a checkpoint write (.checkpoint.pth.tmp-", "aimed at evaluation",
                 "to the process group", "to main.py (with 2 workers)"):
        assert any(kind in line for line in kills), (kind, proc.stdout)
    assert re.search(r"file-size limit [\d.]+ MB: exit 1, checkpoint.pth unchanged", proc.stdout), proc.stdout
    assert "error: could not write checkpoint" in "".join(p.read_text() for p in (workdir / "starts").iterdir())
    assert [e["epoch"] for e in read_log(workdir / "chaos")] == [0, 1]
    assert (board["caught"], board["identical"], proc.returncode) == (1, "yes", 0), proc.stdout
    assert "(fell back to checkpoint0000.pth)" in proc.stdout


def test_torchrun_two_processes_survive_kills(data, tmp_path):
    proc = run_chaos(data, tmp_path, "--kills", "2", "--seed", "1", "--nproc", "2", "--no_bit_flip")
    assert scoreboard(proc) == {"survived": 2, "landed": 2, "failures": 0, "corrupt": 0, "caught": 0, "flips": 0,
                                "identical": "yes"}, proc.stdout
    assert proc.returncode == 0
    assert "SIGKILL to rank 0" in proc.stdout and "SIGTERM to every process group of the job" in proc.stdout, \
        proc.stdout
    assert "world size: 2" in (tmp_path / "chaos" / "info.txt").read_text()


def test_any_difference_from_the_reference_is_found_and_fails_the_scoreboard(one_process, tmp_path):
    workdir, _ = one_process
    reference = workdir / "reference"
    assert differences(reference, reference) == []
    changed = tmp_path / "changed"
    shutil.copytree(reference, changed)
    checkpoint = torch.load(changed / "checkpoint.pth", weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name].view(-1)[0] += 1e-3
    checkpoint["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1e-3
    atomic_save(checkpoint, changed / "checkpoint.pth")
    log = [json.loads(line) for line in (changed / "log.txt").read_text().splitlines()]
    log[1]["train_loss"] += 1e-6
    (changed / "log.txt").write_text("".join(json.dumps(e) + "\n" for e in log))
    found = differences(reference, changed)
    assert found == [f"model: 1 of {len(checkpoint['model'])} tensors differ, e.g. {name}",
                     f"optimizer state: 1 of {sum(map(len, checkpoint['optimizer']['state'].values()))} tensors "
                     "differ, e.g. 0.exp_avg",
                     "log.txt epoch 1: train_loss"]
    board = Board(landed=3, survived=3, flips=1, flip_rejected=True, differences=found)
    assert not board.ok()
    assert board.line() == ("kills survived 3/3, resume failures 0, corrupt files 0, bit flips caught 0/1, "
                            "final state identical: no")


@pytest.mark.parametrize("extra, used, message", [
    (["--output_dir", "elsewhere"], False, "error: --output_dir cannot be passed to main.py here: the tool chooses"),
    ([], True, "already exist(s): choose another --workdir or remove them"),
    (["--options", "epoch=3"], False, "'epoch'"),  # main.py's own check of the command line
], ids=["output_dir", "used-workdir", "bad-option"])
def test_a_command_the_tool_cannot_score_is_refused_in_one_line(tmp_path, capsys, extra, used, message):
    if used:
        (tmp_path / "chaos").mkdir()
    code = chaos_main(["--kills", "1", "--workdir", str(tmp_path), "-c", str(ROOT / "config/DINO/DINO_demo.py"),
                       *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, \
        err
    assert not (tmp_path / "reference").exists()
