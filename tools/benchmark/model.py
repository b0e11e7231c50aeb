"""The model's table: size, FLOPs, speed against the reference attention core and under bfloat16, the time inside
the library kernels, peak memory, the attention core alone and, with --against REV, REV's code."""
import statistics
import tempfile

import torch

from tools.benchmark import ROOT, progress
from tools.benchmark.flops import (attention_core, core_errors, count_flops, encoder_core_inputs, reference_core,
                                   sampling_flops)
from tools.benchmark.report import Table
from tools.benchmark.revisions import Worker, revision_worktree
from tools.benchmark.timing import interleaved, ratio, summary, timer
from tools.benchmark.workloads import KERNELS, KernelTimes, Workload, matmul_rate, peak_memory


def benchmark(opts) -> dict:
    from util import determinism
    torch.set_num_threads(opts.threads)
    determinism.configure(True)  # as main.py runs by default; the training step is also timed without it
    device, runs, batch = opts.device, opts.runs, opts.batch
    table = Table()
    progress(f"building the model from {opts.config}")
    work = Workload(opts.config, opts.options, opts.size, batch, device)
    params = list(work.model.parameters())
    table.add("parameters_total", "parameters, total", sum(p.numel() for p in params), "count")
    table.add("parameters_trainable", "parameters, trainable", sum(p.numel() for p in params if p.requires_grad),
              "count")

    progress(f"fp32 matmul rate, {opts.threads} threads")
    matmul = matmul_rate(device, runs)
    table.add("matmul", f"fp32 matmul 2048x2048, {opts.threads} threads", matmul, "GFLOP/s")
    flops, calls = flop_rows(table, work, batch)
    speed_rows(table, work, opts, flops, matmul)

    kernels = None
    if device == "cpu":
        progress(f"training step: time inside the library kernels, op by op, {runs} runs")
        kernels = kernel_rows(table, work.train_step, runs)

    progress("peak memory")
    for key, what, fn in (("eval", "eval forward", work.eval_forward), ("train", "training step", work.train_step)):
        mib, how = peak_memory(fn, device)
        table.add(f"peak_memory_{key}", f"peak memory, {what}", mib, f"MiB ({how})")

    encoder = max(calls, key=lambda call: call[2][1])  # the encoder's self-attention has the most queries
    del work
    core_rows(table, encoder, device, runs, matmul)
    against = compare_revision(opts, table, flops, matmul, kernels) if opts.against else None

    h, w = opts.size
    table.print(f"# {' '.join([opts.config, *(opts.options or [])])}, {h}x{w}, batch {batch}, {device}, "
                f"{opts.threads} threads, torch {torch.__version__}: medians of {runs} runs after 1 warm-up (min-max); "
                f"ratios: per-round ratios of interleaved rounds")
    return {"setup": {"config": opts.config, "options": opts.options or [], "size": [h, w], "batch": batch,
                      "device": device, "threads": opts.threads, "runs": runs, "torch": torch.__version__,
                      "against": against},
            "rows": table.rows}


def flop_rows(table, work, batch):
    """({"eval": FLOPs, "train": FLOPs} of the batch, the attention core calls of an eval forward), counted with
    the reference core, plus the core's sampling FLOPs from its shapes."""
    progress("counting FLOPs of an eval forward and a training step")
    # with autograd on: under no_grad FlopCounterMode's module tracker fails on views of parameters (torch 2.14)
    counted, calls = count_flops(lambda: work.model.eval()(work.samples))
    sampling = sum(sampling_flops(v, loc) for v, _, loc in calls)
    train_counted, train_calls = count_flops(work.train_step)
    # forward + backward: backward counted as twice the forward, the usual convention
    flops = {"eval": counted + sampling,
             "train": train_counted + 3 * sum(sampling_flops(v, loc) for v, _, loc in train_calls)}
    table.add("gflops_counted", "GFLOPs per image, eval forward, FlopCounterMode", counted / batch / 1e9, "GFLOP")
    table.add("gflops_sampling", "GFLOPs per image, eval forward, deformable sampling (analytic)",
              sampling / batch / 1e9, "GFLOP")
    table.add("gflops_eval", "GFLOPs per image, eval forward, total", flops["eval"] / batch / 1e9, "GFLOP")
    table.add("gflops_train", "GFLOPs per image, training step (fwd+bwd)", flops["train"] / batch / 1e9, "GFLOP")
    return flops, calls


def speed_rows(table, work, opts, flops, matmul) -> None:
    """Eval forward and training step: ours, with the reference attention core swapped in and under bfloat16
    autocast, in interleaved rounds; the training step also as --no-deterministic runs it."""
    device, runs, batch = opts.device, opts.runs, opts.batch
    for key, what, fn in (("eval", "eval forward", work.eval_forward),
                          ("train", "training step (DN, loss, backward, AdamW)", work.train_step)):
        progress(f"{what}: ours and with the reference attention core, interleaved, {runs} runs")

        def with_reference(fn=fn):
            with attention_core(lambda core: reference_core):
                fn()
        variants = {"ours": timer(fn, device), "reference": timer(with_reference, device),
                    "bf16": timer(lambda fn=fn: fn(torch.bfloat16), device)}
        if key == "train":
            variants["nondeterministic"] = timer(without_determinism(fn), device)
        times = interleaved(variants, runs)
        table.add(key, f"{what}, batch {batch}", summary(times["ours"]), "s", flops[key], matmul)
        if key == "eval":
            table.add("eval_images_per_s", "eval forward, images/s", summary([batch / t for t in times["ours"]]),
                      "images/s")
        table.add(f"{key}_reference_core", f"{what}, reference attention core", summary(times["reference"]), "s",
                  flops[key], matmul)
        table.add(f"{key}_ratio_reference_core", f"{what}: reference core time / ours",
                  ratio(times["reference"], times["ours"]), "x")
        table.add(f"{key}_bf16", f"{what}, bfloat16 autocast (main.py --amp)", summary(times["bf16"]), "s")
        table.add(f"{key}_ratio_bf16", f"{what}: float32 time / bfloat16 autocast", ratio(times["ours"], times["bf16"]),
                  "x")
        if key == "train":
            table.add("train_nondeterministic", f"{what}, --no-deterministic (torch's default kernels)",
                      summary(times["nondeterministic"]), "s", flops[key], matmul)
            table.add("train_ratio_deterministic", f"{what}: the cost of --deterministic (its time / "
                      f"--no-deterministic)", ratio(times["ours"], times["nondeterministic"]), "x")


def without_determinism(fn):
    """fn as main.py --no-deterministic runs it: torch's default kernels; on CUDA, grid_sample's attention core,
    whose backward accumulates with atomics."""
    from util import determinism

    def run():
        determinism.configure(False)
        try:
            fn()
        finally:
            determinism.configure(True)
    return run


def kernel_rows(table, train_step, runs) -> dict:
    """How much of a training step the library kernels take, and so how fast the step could get if everything
    else cost nothing: step time / kernel time, per round (a plain step, then one timed op by op)."""
    train_step()
    steps, times = [], {group: [] for group in [*KERNELS, "other"]}
    for _ in range(runs):
        steps.append(timer(train_step)())
        with KernelTimes() as timed:
            train_step()
        for group, seconds in timed.seconds.items():
            times[group].append(seconds)
    total = [sum(times[group][i] for group in KERNELS) for i in range(runs)]
    for group, (what, _) in KERNELS.items():
        table.add(f"train_kernel_{group}", f"training step: inside {what}", summary(times[group]), "s")
    table.add("train_kernel_other", "training step: inside all other ops", summary(times["other"]), "s")
    table.add("train_kernels", "training step: inside those library kernels, in all", summary(total), "s")
    table.add("train_ratio_kernels", "training step: step time / time inside the library kernels",
              ratio(steps, total), "x")
    return summary(total)


def core_rows(table, call, device, runs, matmul) -> None:
    """The attention core, ours against the reference formula, fwd+bwd on random inputs of the call's shapes."""
    from models.ops import multi_scale_deformable_attn
    value, locations, weights, grad = encoder_core_inputs(call, device)
    shapes, queries = call[1], call[2][1]
    progress(f"attention core fwd+bwd at encoder shapes ({queries} queries), ours and reference, interleaved")

    def fwd_bwd(core):
        inputs = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
        return timer(lambda: core(inputs[0], shapes, inputs[1], inputs[2]).backward(grad), device)
    times = interleaved({"ours": fwd_bwd(multi_scale_deformable_attn), "reference": fwd_bwd(reference_core)}, runs)
    flops = 3 * sampling_flops(call[0], call[2])  # backward counted as twice the forward
    what = f"attention core fwd+bwd, encoder, {queries} queries x {len(shapes)} levels"
    table.add("core", what, summary(times["ours"]), "s", flops, matmul)
    table.add("core_reference", "attention core fwd+bwd, reference formula", summary(times["reference"]), "s",
              flops, matmul)
    table.add("core_ratio", "attention core: reference time / ours", ratio(times["reference"], times["ours"]), "x")
    errors = core_errors(multi_scale_deformable_attn, shapes, value, locations, weights, grad)
    table.add("core_error", "attention core max abs error (output, grads) against float64", errors["ours"], "")
    table.add("core_reference_error", "attention core max abs error, reference formula in float32",
              errors["reference"], "")


def compare_revision(opts, table, flops, matmul, kernels) -> dict:
    """Ours and REV, each in a worker of this tool built from its own tree, timed in alternating rounds.
    With the library kernels' time of our step (kernels), the largest speed-up over REV that any change outside
    those kernels could reach: REV's step time / that time, a ratio of medians."""
    rev = opts.against
    with revision_worktree(rev) as (path, commit), tempfile.TemporaryDirectory() as logs:
        workers = []
        try:
            progress(f"starting the workers: ours and {rev}")
            workers = [Worker("ours", ROOT, opts, logs), Worker(rev, path, opts, logs)]
            for key, what in (("eval", "eval forward"), ("train", "training step")):
                progress(f"{what}: ours, ours with bfloat16 autocast and {rev}, interleaved rounds, {opts.runs} runs")
                ours, theirs = workers
                times = interleaved({"ours": ours.timed(key), "ours_bf16": ours.timed(f"{key}_bf16"),
                                     rev: theirs.timed(key)}, opts.runs)
                against_rows(table, key, what, rev, times, flops[key], matmul)
                if key == "train" and kernels:
                    table.add("train_ratio_against_kernels", f"training step: {rev} time / ours inside the library "
                              f"kernels (medians)", statistics.median(times[rev]) / kernels["median"], "x")
        finally:
            for worker in workers:
                worker.close()
    return {"rev": rev, "commit": commit, "worktree": str(path)}


def against_rows(table, key, what, rev, times, flops, matmul) -> None:
    """The rows of one workload timed by the workers: ours, REV, ours under bfloat16 autocast, and REV's ratios."""
    table.add(f"{key}_ours_worker", f"{what}, ours (worker)", summary(times["ours"]), "s", flops, matmul)
    table.add(f"{key}_against", f"{what}, {rev}", summary(times[rev]), "s")
    table.add(f"{key}_ratio_against", f"{what}: {rev} time / ours", ratio(times[rev], times["ours"]), "x")
    table.add(f"{key}_bf16_worker", f"{what}, ours with bfloat16 autocast (worker)", summary(times["ours_bf16"]), "s")
    table.add(f"{key}_ratio_against_bf16", f"{what}: {rev} time / ours with bfloat16 autocast",
              ratio(times[rev], times["ours_bf16"]), "x")
