"""Gradient accumulation, bfloat16 mixed precision and recovery from running out of memory, through main.py.

Accumulated and split batches equal one large batch only when nothing mixes the images of a batch: the
comparisons use group norm (not batch statistics) and no denoising queries (their count and noise depend on
the batch), as any gradient accumulation would need."""
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from datasets.sampler import GlobalBatchSampler
from engine import train_one_epoch
from training.step import TrainStep, linear_warmup
from models import build_model
from models.ops import multi_scale_deformable_attn
from runner import (DEMO, ROOT, TINY_OPTIONS, assert_same_training, popen_main, read_log, run_main,
                    wait_for_event)
from tiny import tiny_args
from util.misc import nested_tensor_from_tensor_list

BATCH_INDEPENDENT = ["use_dn=False", "backbone_norm=gn", "epochs=1"]
ACCUMULATED = BATCH_INDEPENDENT + ["batch_size=2", "accumulate_steps=4"]  # 16 images: 2 steps of 4 x 2
ONE_BATCH = BATCH_INDEPENDENT + ["batch_size=8"]  # the same effective batches in one piece

def _run_injected(data, out, faults):
    """main.py with a DINO_FAULTS plan (util/faults.py): its errors are thrown before any work of their pass,
    so the retried step is the only change."""
    proc = popen_main(data, out, options=ONE_BATCH, env={"DINO_FAULTS": json.dumps(faults)})
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


def _parameters(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)["model"]


def _assert_same_up_to_rounding(ref_dir, other_dir):
    """Equal losses, and parameters equal to 1e-5 except a few: AdamW's first steps move each parameter by about
    lr * sign(gradient), so where a gradient is within rounding of zero that step may go either way (by lr)."""
    ref, other = _parameters(ref_dir), _parameters(other_dir)
    assert ref.keys() == other.keys()
    differences = torch.cat([(ref[k].float() - other[k].float()).abs().flatten() for k in ref])
    assert (differences > 1e-5).float().mean() < 1e-4 and differences.max() <= 2 * 5e-4  # the demo's float32 lr
    ref_log, other_log = read_log(ref_dir)[0], read_log(other_dir)[0]
    train_keys = [k for k in ref_log if k.startswith("train_")]
    assert len(train_keys) > 10 and set(train_keys) == {k for k in other_log if k.startswith("train_")}
    assert [other_log[k] for k in train_keys] == pytest.approx([ref_log[k] for k in train_keys], rel=1e-5)


@pytest.fixture(scope="module")
def accumulated(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("accumulated")
    proc = run_main(data, out, options=ACCUMULATED)
    assert "2 iterations per epoch" in proc.stdout
    return out


@pytest.fixture(scope="module")
def one_batch(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_batch")
    proc = run_main(data, out, options=ONE_BATCH)
    assert "2 iterations per epoch" in proc.stdout
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_accumulation_windows_hold_the_images_of_one_large_batch(processes):
    """Over all processes, each window of 2 accumulated batches of 2 holds the images of one step with batch 4."""
    def steps(batch_size, accumulate):
        per_rank = [list(GlobalBatchSampler(16, batch_size, seed=42, num_replicas=processes, rank=rank))
                    for rank in range(processes)]
        return [sorted(key for rank in per_rank for batch in rank[i:i + accumulate] for key in batch)
                for i in range(0, len(per_rank[0]), accumulate)]
    assert steps(2, 2) == steps(4, 1)


def test_four_accumulated_batches_train_like_one_batch_of_all(accumulated, one_batch):
    _assert_same_up_to_rounding(one_batch, accumulated)


def _stopped_by_sigterm_and_resumed(data, out, options, done: int):
    """main.py stopped by SIGTERM after its progress line for `done` of 8 iterations, then rerun to the end:
    (the iteration the stop saved, the rerun)."""
    proc = popen_main(data, out, options=options)
    wait_for_event(proc, out, "step", epoch=0, iteration=done)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, rest
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["iteration"]
    assert done <= saved < 8  # the step under way when the signal came was finished
    return saved, run_main(data, out, options=options)


def test_sigterm_inside_accumulation_resumes_bit_exactly(data, tmp_path):
    options = ["batch_size=1", "accumulate_steps=2", "epochs=1"]  # 8 windows of 2 x 1, denoising on
    reference = run_main(data, tmp_path / "reference", options=options)
    assert "8 iterations per epoch" in reference.stdout
    saved, resumed = _stopped_by_sigterm_and_resumed(data, tmp_path / "run", options, done=2)
    assert f"epoch 0, iteration {saved} of 8" in resumed.stdout  # a window boundary
    assert_same_training(tmp_path / "reference", tmp_path / "run")


def test_a_stop_signal_inside_a_long_window_saves_the_window_start_at_once(data, tmp_path):
    """accumulate_steps=8: the signal comes during the 3rd batch of the first window. The run saves the window's
    start at the next batch, not after 5 more (a scheduler's grace period may be shorter than a window), with
    the batch-norm statistics and random state of that start: the rerun ends bit-identical."""
    options = ["batch_size=1", "accumulate_steps=8", "epochs=1"]  # 2 windows of 8 x 1, denoising and batch norm on
    run_main(data, tmp_path / "reference", options=options)
    proc = popen_main(data, tmp_path / "run", options=options,
                      env={"DINO_FAULTS": '[{"at": "forward", "call": 3, "error": "sigterm"}]'})
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 3, output[-3000:]
    assert "SIGTERM received during epoch 0: saved " in output and "at iteration 0, the start of the step" in output
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["iteration"] == 0
    rerun = run_main(data, tmp_path / "run", options=options)
    assert "epoch 0, iteration 0 of 2" in rerun.stdout
    assert_same_training(tmp_path / "reference", tmp_path / "run")


def test_out_of_memory_retries_the_step_in_halves_and_trains_the_same(data, one_batch, tmp_path):
    code, output = _run_injected(data, tmp_path / "out", [{"at": "forward", "call": 2, "error": "oom"}])
    assert code == 0, output[-3000:]
    assert ("out of memory at epoch 0 iteration 1 with batch 8: retrying as 2 micro-batches of 4 image(s)"
            in output)
    _assert_same_up_to_rounding(one_batch, tmp_path / "out")


@pytest.mark.parametrize("fault", [{"at": "forward", "rank": 0, "call": 2, "error": "oom"},
                                   {"at": "backward", "rank": 1, "call": 2, "error": "oom"}],
                         ids=["forward of process 0", "backward of process 1"])
def test_out_of_memory_on_one_of_two_processes_makes_both_retry_and_train_the_same(data, one_batch, tmp_path,
                                                                                    fault):
    """torchrun, 2 processes of batch 4: the same steps of 8 images as one process of batch 8. One process runs
    out of memory in its 2nd step's forward, or in the middle of its backward (raised by autograd); both must
    switch to micro-batches, and no process may wait in a collective for the other."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"),
           "-c", DEMO, "--coco_path", str(data), "--output_dir", str(tmp_path / "out"), "--num_workers", "0",
           "--no-amp", "--options", *TINY_OPTIONS, *BATCH_INDEPENDENT, "batch_size=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DINO_FAULTS": json.dumps([fault])},
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:  # the processes disagreed and wait for each other
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    assert "out of memory at epoch 0 iteration 1 with batch 4: retrying as 2 micro-batches of 2 image(s)" in output
    _assert_same_up_to_rounding(one_batch, tmp_path / "out")


def test_out_of_memory_with_one_image_stops_with_a_clear_error(data, tmp_path):
    code, output = _run_injected(data, tmp_path / "out", [{"at": "forward", "error": "oom"}])
    assert code == 1
    assert "retrying as 8 micro-batches of 1 image(s)" in output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: out of memory at epoch 0 iteration 0 with batch 8, even with one image per "
                            "micro-batch: lower the image sizes"), output[-3000:]
    assert "Traceback" not in output


def test_bfloat16_run_on_cpu_completes_an_epoch_with_finite_losses(data, tmp_path):
    run_main(data, tmp_path, "--amp", options=["amp_dtype=bfloat16", "epochs=1"])
    log = read_log(tmp_path)
    losses = {k: v for k, v in log[0].items() if k.startswith(("train_loss", "test_loss"))}
    assert len(losses) > 20 and all(math.isfinite(v) for v in losses.values()), losses
    assert 0 < log[0]["train_loss"] < 100


def test_the_demo_turns_amp_on_and_no_amp_turns_it_off(data, tmp_path):
    """DINO_demo.py turns --amp on through cli_defaults, with the precision this CPU runs fast; --no-amp on the
    command line wins."""
    run_main(data, tmp_path / "amp", options=["epochs=1"], precision=())
    run_main(data, tmp_path / "no-amp", "--no-amp", options=["epochs=1"])
    amp_header = (tmp_path / "amp" / "info.txt").read_text()
    assert ("| precision: bfloat16 autocast: this CPU runs it natively" in amp_header
            or "| precision: float32: this CPU emulates bfloat16" in amp_header), amp_header[:2000]
    assert "| precision: float32 (--amp is off)" in (tmp_path / "no-amp" / "info.txt").read_text()
    assert json.loads((tmp_path / "amp" / "config_args_all.json").read_text())["amp"] is True
    assert json.loads((tmp_path / "no-amp" / "config_args_all.json").read_text())["amp"] is False
    losses = [read_log(tmp_path / name)[0]["train_loss"] for name in ("amp", "no-amp")]
    assert all(0 < loss < 100 for loss in losses)
    assert (losses[0] != losses[1]) == ("bfloat16 autocast" in amp_header)


def test_float16_on_cpu_is_a_clear_error(data, tmp_path):
    proc = run_main(data, tmp_path, "--amp", options=["epochs=1", "amp_dtype=float16"], check=False)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1] == (
        "error: --amp with amp_dtype=float16 needs CUDA, and the device is cpu: use --options amp_dtype=auto "
        "(bfloat16 where this CPU runs it natively)")


def test_bfloat16_training_learns_a_fixed_batch_with_float32_losses():
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(backbone_norm="gn"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 64, 64)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, targets)
        loss_dict = criterion(outputs, targets)
    assert outputs["pred_logits"].dtype == torch.bfloat16  # autocast is on, yet the losses are float32
    assert {v.dtype for v in loss_dict.values()} == {torch.float32}
    step = TrainStep(model, criterion, optimizer, "cpu", max_norm=0.1, amp_dtype=torch.bfloat16)
    losses = [train_one_epoch(step, [(images, targets)], 0)["loss"] for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


def test_attention_core_under_bfloat16_autocast_is_close_to_float32():
    case = torch.load(ROOT.parent / "shared" / "reference" / "msda_vectors.pt", weights_only=True)["cases"][0]
    value, locations, weights = case["value"], case["sampling_locations"], case["attention_weights"]
    expected = multi_scale_deformable_attn(value, case["spatial_shapes"], locations, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the module feeds it: projections in bfloat16
        out = multi_scale_deformable_attn(value.bfloat16(), case["spatial_shapes"], locations, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_ema_decay_warms_up_as_configured_and_is_fixed_without_warm_up():
    from util.ema import build_ema
    model = torch.nn.Linear(2, 1)
    steps = [torch.full_like(model.weight, float(i)) for i in range(6)]
    warmed, fixed = build_ema(model, 0.9, warmup_iters=3), build_ema(model, 0.9, warmup_iters=0)
    expected_warmed = expected_fixed = None
    for n, value in enumerate(steps):
        with torch.no_grad():
            model.weight.copy_(value)
        warmed.update_parameters(model)
        fixed.update_parameters(model)
        if n == 0:  # the first update copies the weights
            expected_warmed = expected_fixed = value.clone()
        else:
            decay = 0.9 * (1 - math.exp(-n / 3))
            expected_warmed = decay * expected_warmed + (1 - decay) * value
            expected_fixed = 0.9 * expected_fixed + 0.1 * value
    assert torch.allclose(warmed.module.weight, expected_warmed)
    assert torch.allclose(fixed.module.weight, expected_fixed)
    assert not torch.allclose(expected_warmed, expected_fixed)
    for decay, warmup, message in ((1.5, 0, "ema_decay must be in [0, 1]"),
                                   (0.9, -1, "ema_warmup_iters must be >= 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            build_ema(model, decay, warmup)


def test_linear_warmup_factors():
    assert linear_warmup(0, 0) is None and linear_warmup(4, 4) is None
    first, second = linear_warmup(6, 0), linear_warmup(6, 4)
    assert [first(it) for it in range(4)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6]
    assert [second(it) for it in range(4)] == [5 / 6, 1.0, 1.0, 1.0]


def test_warm_ups_of_the_lr_and_the_ema_resume_bit_exactly_after_sigterm(data, tmp_path):
    options = ["epochs=1", "use_ema=True", "ema_decay=0.99", "ema_warmup_iters=4", "lr_warmup_iters=6"]
    run_main(data, tmp_path / "reference", options=options)
    # 8 steps, the first 6 at 1/6, 2/6, ... 6/6 of the demo's float32 lr 5e-4: the logged mean lr says they ran so.
    assert read_log(tmp_path / "reference")[0]["train_lr"] == pytest.approx(5e-4 * (21 / 6 + 2) / 8)
    _stopped_by_sigterm_and_resumed(data, tmp_path / "run", options, done=3)  # the warm-up spans steps 1-6
    assert_same_training(tmp_path / "reference", tmp_path / "run")
    ref, resumed = (torch.load(d / "checkpoint.pth", weights_only=True)["ema_model"]
                    for d in (tmp_path / "reference", tmp_path / "run"))
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert ref["n_averaged"].item() == 8
    ema_ap = [read_log(d)[0]["ema_test_coco_eval_bbox"] for d in (tmp_path / "reference", tmp_path / "run")]
    assert ema_ap[0] == ema_ap[1]
