"""The project's benchmark: model size, FLOPs, speed and memory, with every comparison measured in the same run.

    python tools/benchmark.py -c config/DINO/DINO_4scale.py [--size 320 480] [--batch 1] [--device cpu|cuda]
                              [--runs 5] [--threads 2] [--options k=v ...] [--against REV] [--json FILE]
    python tools/benchmark.py --demo [--against REV] [--repeats 2] [--targets 0.5 0.65] [--demo_options k=v ...]

Timings are medians of --runs repeats (min-max) after one warm-up. Absolute times move by 2x between days and
machines, so every ratio compares two workloads timed in this run, in interleaved rounds (A, B, A, B, ...): the
attention core against the reference formula, the model against itself with the reference core swapped in
and under bfloat16 autocast (main.py --amp --options amp_dtype=bfloat16), and with --against REV the code of
git revision REV (checked out into a temporary worktree, removed at the end) against ours, each side in a
worker subprocess of this script that builds the model with its own revision's code.
A ratio is the median (min-max) of the per-round ratios baseline time / our time: above 1 means ours is faster.
On CPU a training step is also timed op by op (KernelTimes): the time inside the matmul, convolution and attention
kernels, whose speed is the library's, bounds what any change that leaves their work as it is can win (with
--against REV: REV's step time / that time).
FLOPs count a multiply-add as 2 (FlopCounterMode's convention; papers quoting fvcore count it as 1); the
attention core's sampling, invisible to FlopCounterMode, is counted from its shapes (sampling_flops).

--demo trains the demo (main.py -c config/DINO/DINO_demo.py) for this tree and REV, back to back in alternating
order, and reports the wall time from each command's start until its log.txt showed the target APs.
"""
import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "config/DINO/DINO_demo.py"
BOXES_PER_IMAGE = 5


class BenchmarkError(Exception):
    """A problem the user can fix (a bad revision, config or option): reported as one line."""


def progress(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def summary(samples) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


def median_time(fn, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up call."""
    return statistics.median(interleaved({"fn": timer(fn)}, runs)["fn"])


def timer(fn, device: str = "cpu"):
    """fn -> a function that calls it and returns the seconds it took (queued CUDA work included)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    return timed


def interleaved(timed: dict, runs: int) -> dict:
    """One warm-up call of each, then `runs` rounds that call each in turn: {name: [seconds per round]}.

    Alternating rounds expose every workload to the same drift of a shared machine, so their ratio holds."""
    for fn in timed.values():
        fn()
    times = {name: [] for name in timed}
    for _ in range(runs):
        for name, fn in timed.items():
            times[name].append(fn())
    return times


def ratio(baseline, ours) -> dict:
    """Per-round ratios baseline / ours of interleaved rounds."""
    return summary([b / o for b, o in zip(baseline, ours)])


# ---------------------------------------------------------------------------------------------- attention core

def reference_core(value, shapes, locations, weights):
    """The attention core written as the official pure-PyTorch formula (stack, multiply, sum): the baseline."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w_ = weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w_).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def sampling_flops(value_shape, locations_shape) -> int:
    """Forward FLOPs of one attention core call, which FlopCounterMode does not see (grid_sample, elementwise).

    Per query, head, level, point and channel: bilinear interpolation reads 4 corners and takes 4 multiplies
    + 3 adds = 7 FLOPs, the attention weighting 1 multiply + 1 add = 2: 9 * N * Lq * M * L * P * D in all
    (the corner weights, computed once per point for all D channels, are left out)."""
    n, lq, m, levels, points, _ = locations_shape
    return 9 * n * lq * m * levels * points * value_shape[-1]


@contextlib.contextmanager
def attention_core(wrap):
    """Route every MSDeformAttn of the model through wrap(core), the module's own core function."""
    from models.ops import ms_deform_attn
    core = ms_deform_attn.multi_scale_deformable_attn
    ms_deform_attn.multi_scale_deformable_attn = wrap(core)
    try:
        yield
    finally:
        ms_deform_attn.multi_scale_deformable_attn = core


def count_flops(fn):
    """(FlopCounterMode's FLOPs, [(value shape, spatial shapes, locations shape)] of the core calls) of fn()."""
    calls = []

    def recording(core):
        # The reference formula runs instead of our core: FlopCounterMode would count the core's sparse
        # sampled matmul as a dense one over the whole value table.
        def record(value, shapes, locations, weights):
            shapes = [tuple(int(x) for x in s) for s in shapes]
            calls.append((tuple(value.shape), shapes, tuple(locations.shape)))
            return reference_core(value, shapes, locations, weights)
        return record
    with attention_core(recording), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), calls


def encoder_core_inputs(call, device):
    """Random inputs of the recorded encoder call's shapes; about 1 in 5 points falls outside the map."""
    value_shape, shapes, locations_shape = call
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(value_shape, generator=gen)
    locations = torch.rand(locations_shape, generator=gen) * 1.3 - 0.15
    weights = torch.rand(locations_shape[:-1], generator=gen).flatten(-2).softmax(-1).view(locations_shape[:-1])
    grad = torch.randn(value_shape[0], locations_shape[1], value_shape[2] * value_shape[3], generator=gen)
    return [t.to(device) for t in (value, locations, weights, grad)]


def core_errors(core, shapes, value, locations, weights, grad) -> dict:
    """Largest |float32 result - exact result| over the output and the three input gradients, of our core and of
    the reference formula, the exact result being the reference computed in float64. The location gradients sum
    differences of neighbouring values times the map size, so any float32 formulation is off by ~1e-4 there;
    ours against the reference alone would show their rounding differences, not which one is right."""
    def results(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(grad.to(dtype))
        return [out.detach()] + [t.grad for t in inputs]
    exact = results(reference_core, torch.float64)
    return {name: max((a.double() - b).abs().max().item() for a, b in zip(results(fn, torch.float32), exact))
            for name, fn in (("ours", core), ("reference", reference_core))}


# ---------------------------------------------------------------------------------------------- the model

class Workload:
    """One revision's model, criterion and optimizer with one synthetic batch, built by the code on sys.path.

    Needs only main.parse_args, models.build_model and util.misc.nested_tensor_from_tensor_list, which every
    revision has, so the same worker times old revisions too."""

    def __init__(self, config, options, size, batch, device):
        import main
        from models import build_model
        from util.misc import nested_tensor_from_tensor_list
        self.args = main.parse_args(["-c", config, "--device", device] + (["--options", *options] if options else []))
        torch.manual_seed(0)
        self.model, self.criterion, _ = build_model(self.args)
        self.model.to(device)
        self.criterion.to(device)
        try:  # the revision's own choice (ours: fused AdamW)
            from training.optim import build_optimizer as make_optimizer
        except ImportError:  # revisions before training/
            make_optimizer = getattr(main, "_optimizer", None)
        self.optimizer = make_optimizer(self.model, self.args) if make_optimizer else torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.args.lr,
            weight_decay=self.args.weight_decay)
        gen = torch.Generator().manual_seed(0)
        self.samples = nested_tensor_from_tensor_list(
            [torch.randn(3, *size, generator=gen) for _ in range(batch)]).to(device)

        def target():  # BOXES_PER_IMAGE boxes (cx, cy, w, h), normalised, well inside the image
            labels = torch.randint(0, self.args.num_classes, (BOXES_PER_IMAGE,), generator=gen)
            boxes = torch.cat([0.2 + 0.6 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen),
                               0.05 + 0.3 * torch.rand(BOXES_PER_IMAGE, 2, generator=gen)], 1)
            return {"labels": labels.to(device), "boxes": boxes.to(device)}
        self.targets = [target() for _ in range(batch)]

    def eval_forward(self, autocast_dtype=None):
        self.model.eval()
        with torch.no_grad(), _autocast(self.samples.tensors.device, autocast_dtype):
            self.model(self.samples)

    def train_step(self, autocast_dtype=None):
        """What an iteration of training does: forward with denoising, loss, backward, clipping, AdamW step;
        with autocast_dtype, the forward and loss run under autocast as `main.py --amp` runs them."""
        self.model.train()
        self.criterion.train()
        with _autocast(self.samples.tensors.device, autocast_dtype):
            losses = self.criterion(self.model(self.samples, self.targets), self.targets)
        loss = sum(losses[k] * w for k, w in self.criterion.weight_dict.items() if k in losses)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_max_norm)
        self.optimizer.step()


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_memory(fn, device: str):
    """(MiB, how) of the memory fn() needs at its peak above what was in use before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        # Linux: free memory that malloc keeps is given back first, or the phase would reuse it unseen; then
        # writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib(status, "VmRSS")
        fn()
        return (_status_kib(status, "VmHWM") - before) / 1024, "peak RSS growth, malloc_trim + VmHWM reset"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a high-water mark: 0 when below an earlier peak
    fn()
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20, "ru_maxrss growth"


# The library kernels whose speed this code does not choose: their time bounds what any change that leaves their
# work as it is can win.
KERNELS = {"matmul": ("dense matrix products (mm, addmm, bmm)", {"mm", "addmm", "bmm", "baddbmm"}),
           "conv": ("convolutions, forward and backward", {"convolution", "convolution_backward"}),
           "sdpa": ("scaled dot-product attention, forward and backward",
                    {"_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward"})}


class KernelTimes(TorchDispatchMode):
    """Seconds spent inside each group of KERNELS' ops, and inside all other ops, timed op by op (CPU only:
    the ops run synchronously there). The dispatch adds a few microseconds between ops, never inside one."""

    def __init__(self):
        super().__init__()
        self.seconds = dict.fromkeys([*KERNELS, "other"], 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        dense = all(t.layout == torch.strided for t in args if isinstance(t, torch.Tensor))
        group = next((key for key, (_, ops) in KERNELS.items() if name in ops and dense), "other")
        self.seconds[group] += elapsed
        return out


def _status_kib(status: Path, key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", status.read_text(), re.M).group(1))


def matmul_rate(device: str, runs: int, n: int = 2048) -> dict:
    """GFLOP/s of n x n fp32 matmuls: what the machine can do, to put each workload's GFLOP/s against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = interleaved({"mm": timer(lambda: a @ b, device)}, runs)["mm"]
    return summary([2 * n**3 / t / 1e9 for t in times])


# ---------------------------------------------------------------------------------------------- other revisions

def resolve_revision(rev: str) -> str:
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise BenchmarkError(f"--against {rev}: not a commit of the repository at {ROOT} (try git log --oneline)")
    return found.stdout.strip()


@contextlib.contextmanager
def revision_worktree(rev: str):
    """A temporary `git worktree` of rev: (its root, its commit); removed at the end."""
    commit = resolve_revision(rev)
    path = Path(tempfile.mkdtemp(prefix="benchmark-")) / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                   check=True, capture_output=True)
    progress(f"worktree of {rev} ({commit[:9]}) at {path}")
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)
        progress(f"worktree {path} removed")


def in_tree(root: Path, config: str) -> str:
    """The config path for the tree at root: a file of this repository names the same file there."""
    path = Path(config).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Worker:
    """`benchmark.py --worker ROOT` in a subprocess: builds the workload with ROOT's code and times on request."""

    def __init__(self, label, root, opts, log_dir):
        self.label = label
        self.errors = open(Path(log_dir) / f"{label}.stderr", "w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root), "-c", in_tree(root, opts.config),
               "--size", *map(str, opts.size), "--batch", str(opts.batch), "--device", opts.device,
               "--threads", str(opts.threads)] + (["--options", *opts.options] if opts.options else [])
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)
        self._reply()

    def timed(self, what: str):
        def ask():
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
            return self._reply()["s"]
        return ask

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.errors.seek(0)
            last = (self.errors.read().strip().splitlines() or ["no message"])[-1]
            raise BenchmarkError(f"the worker timing {self.label} exited with code {self.proc.wait()}: {last}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.errors.close()


def worker_main(opts) -> None:
    """Reads 'eval' or 'train' lines, answers each with {"s": seconds of one call} on stdout."""
    replies, sys.stdout = sys.stdout, sys.stderr  # whatever the revision prints goes to stderr
    torch.set_num_threads(opts.threads)
    try:
        work = Workload(opts.config, opts.options, opts.size, opts.batch, opts.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"{type(e).__name__}: {e}")
    jobs = {"eval": timer(work.eval_forward, opts.device), "train": timer(work.train_step, opts.device),
            "eval_bf16": timer(lambda: work.eval_forward(torch.bfloat16), opts.device),
            "train_bf16": timer(lambda: work.train_step(torch.bfloat16), opts.device)}
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        print(json.dumps({"s": jobs[line.strip()]()}), file=replies, flush=True)


# ---------------------------------------------------------------------------------------------- the table

class Table:
    """Rows of measurements, printed as a markdown table and kept for --json."""

    def __init__(self):
        self.rows = {}

    def add(self, key, what, stats, unit, flops=None, matmul=None):
        stats = stats if isinstance(stats, dict) else {"median": stats}
        row = {"what": what, **stats, "unit": unit}
        if flops is not None:
            row["gflops_per_s"] = flops / stats["median"] / 1e9
            row["of_matmul"] = row["gflops_per_s"] / matmul["median"]
        self.rows[key] = row

    def print(self, title):
        print(title)
        print("| what | median | min-max | unit | GFLOP/s | of matmul |")
        print("|---|---|---|---|---|---|")
        for row in self.rows.values():
            spread = f"{_number(row['min'])}-{_number(row['max'])}" if "min" in row else ""
            rate = _number(row["gflops_per_s"]) if "gflops_per_s" in row else ""
            share = f"{100 * row['of_matmul']:.2g}%" if "of_matmul" in row else ""
            print(f"| {row['what']} | {_number(row['median'])} | {spread} | {row['unit']} | {rate} | {share} |")


def _number(x) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def benchmark(opts) -> dict:
    torch.set_num_threads(opts.threads)
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

    progress("counting FLOPs of an eval forward and a training step")
    # with autograd on: under no_grad FlopCounterMode's module tracker fails on views of parameters (torch 2.14)
    counted, calls = count_flops(lambda: work.model.eval()(work.samples))
    sampling = sum(sampling_flops(v, loc) for v, _, loc in calls)
    eval_flops = counted + sampling
    train_counted, train_calls = count_flops(work.train_step)
    # forward + backward: backward counted as twice the forward, the usual convention
    train_flops = train_counted + 3 * sum(sampling_flops(v, loc) for v, _, loc in train_calls)
    table.add("gflops_counted", "GFLOPs per image, eval forward, FlopCounterMode", counted / batch / 1e9, "GFLOP")
    table.add("gflops_sampling", "GFLOPs per image, eval forward, deformable sampling (analytic)",
              sampling / batch / 1e9, "GFLOP")
    table.add("gflops_eval", "GFLOPs per image, eval forward, total", eval_flops / batch / 1e9, "GFLOP")
    table.add("gflops_train", "GFLOPs per image, training step (fwd+bwd)", train_flops / batch / 1e9, "GFLOP")

    for key, what, fn, flops in (("eval", "eval forward", work.eval_forward, eval_flops),
                                 ("train", "training step (DN, loss, backward, AdamW)", work.train_step, train_flops)):
        progress(f"{what}: ours and with the reference attention core, interleaved, {runs} runs")

        def with_reference(fn=fn):
            with attention_core(lambda core: reference_core):
                fn()
        times = interleaved({"ours": timer(fn, device), "reference": timer(with_reference, device),
                             "bf16": timer(lambda fn=fn: fn(torch.bfloat16), device)}, runs)
        table.add(key, f"{what}, batch {batch}", summary(times["ours"]), "s", flops, matmul)
        if key == "eval":
            table.add("eval_images_per_s", "eval forward, images/s", summary([batch / t for t in times["ours"]]),
                      "images/s")
        table.add(f"{key}_reference_core", f"{what}, reference attention core", summary(times["reference"]), "s",
                  flops, matmul)
        table.add(f"{key}_ratio_reference_core", f"{what}: reference core time / ours",
                  ratio(times["reference"], times["ours"]), "x")
        table.add(f"{key}_bf16", f"{what}, bfloat16 autocast (main.py --amp)", summary(times["bf16"]), "s")
        table.add(f"{key}_ratio_bf16", f"{what}: float32 time / bfloat16 autocast", ratio(times["ours"], times["bf16"]),
                  "x")

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

    against = None
    if opts.against:
        against = compare_revision(opts, table, eval_flops, train_flops, matmul, kernels)

    h, w = opts.size
    title = (f"# {' '.join([opts.config, *(opts.options or [])])}, {h}x{w}, batch {batch}, {device}, {opts.threads} "
             f"threads, torch {torch.__version__}: medians of {runs} runs after 1 warm-up (min-max); "
             f"ratios: per-round ratios of interleaved rounds")
    table.print(title)
    return {"setup": {"config": opts.config, "options": opts.options or [], "size": [h, w], "batch": batch,
                      "device": device, "threads": opts.threads, "runs": runs, "torch": torch.__version__,
                      "against": against},
            "rows": table.rows}


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


def compare_revision(opts, table, eval_flops, train_flops, matmul, kernels) -> dict:
    """Ours and REV, each in a worker of this script built from its own tree, timed in alternating rounds.
    With the library kernels' time of our step (kernels), the largest speed-up over REV that any change outside
    those kernels could reach: REV's step time / that time, a ratio of medians."""
    rev = opts.against
    with revision_worktree(rev) as (path, commit), tempfile.TemporaryDirectory() as logs:
        workers = []
        try:
            progress(f"starting the workers: ours and {rev}")
            workers = [Worker("ours", ROOT, opts, logs), Worker(rev, path, opts, logs)]
            for key, what, flops in (("eval", "eval forward", eval_flops),
                                     ("train", "training step", train_flops)):
                progress(f"{what}: ours, ours with bfloat16 autocast and {rev}, interleaved rounds, {opts.runs} runs")
                ours, theirs = workers
                times = interleaved({"ours": ours.timed(key), "ours_bf16": ours.timed(f"{key}_bf16"),
                                     rev: theirs.timed(key)}, opts.runs)
                table.add(f"{key}_ours_worker", f"{what}, ours (worker)", summary(times["ours"]), "s", flops, matmul)
                table.add(f"{key}_against", f"{what}, {rev}", summary(times[rev]), "s")
                table.add(f"{key}_ratio_against", f"{what}: {rev} time / ours", ratio(times[rev], times["ours"]), "x")
                table.add(f"{key}_bf16_worker", f"{what}, ours with bfloat16 autocast (worker)",
                          summary(times["ours_bf16"]), "s")
                table.add(f"{key}_ratio_against_bf16", f"{what}: {rev} time / ours with bfloat16 autocast",
                          ratio(times[rev], times["ours_bf16"]), "x")
                if key == "train" and kernels:
                    table.add("train_ratio_against_kernels", f"training step: {rev} time / ours inside the library "
                              f"kernels (medians)", statistics.median(times[rev]) / kernels["median"], "x")
        finally:
            for worker in workers:
                worker.close()
    return {"rev": rev, "commit": commit, "worktree": str(path)}


# ---------------------------------------------------------------------------------------------- the demo

def read_log(path: Path) -> list:
    """The complete JSON lines of a log.txt (a line still being written is left for the next read)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def best_ap(record: dict) -> float:
    """An epoch's bbox AP: of its best weights, the EMA's when the run keeps an EMA (use_ema) and it is better,
    as checkpoint_best_ema.pth holds them from then on."""
    return max(record["test_coco_eval_bbox"][0], record.get("ema_test_coco_eval_bbox", [-1.0])[0])


def time_to_ap(epochs: list, target: float):
    """Seconds from the command's start until the log showed an epoch with bbox AP >= target; None if never."""
    return next((e["seen_s"] for e in epochs if e["ap"] >= target), None)


def demo_run(label, root, opts, out_dir: Path) -> dict:
    """One demo training of the tree at root, its log.txt watched while it runs to date each epoch's line."""
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, "main.py", "-c", in_tree(root, opts.config), "--output_dir", str(out_dir),
           "--coco_path", str(opts.coco_path)] + (["--options", *opts.demo_options] if opts.demo_options else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    started = time.perf_counter()
    seen = []
    with open(out_dir / "output.txt", "w") as output:
        proc = subprocess.Popen(cmd, cwd=root, stdout=output, stderr=subprocess.STDOUT, env=env)
        while True:
            finished = proc.poll() is not None
            records = read_log(out_dir / "log.txt")
            seen += [time.perf_counter() - started] * (len(records) - len(seen))
            if finished:
                break
            time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (out_dir / "output.txt").read_text().strip().splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        raise BenchmarkError(f"the demo training of {label} exited with code {proc.returncode} (its output above)")
    epochs = [{"epoch": r["epoch"], "epoch_time": r["epoch_time"], "ap": best_ap(r), "seen_s": s}
              for r, s in zip(records, seen)]
    return {"revision": label, "wall_s": wall, "epochs": epochs,
            "time_to_ap": {str(t): time_to_ap(epochs, t) for t in opts.targets}}


def schedule(labels: list, repeats: int) -> list:
    """(repeat, label) in running order: the order alternates, so no revision always runs first."""
    return [(r, label) for r in range(repeats) for label in (labels if r % 2 == 0 else labels[::-1])]


def demo_summary(values: list):
    """median/min/max of the runs' values, or how many runs have none (a target not reached)."""
    missing = sum(v is None for v in values)
    return summary(values) if not missing else {"not_reached": missing, "runs": len(values)}


def _cell(stats: dict) -> str:
    if "not_reached" in stats:
        return f"not reached ({stats['not_reached']} of {stats['runs']} runs)"
    return f"{_number(stats['median'])} ({_number(stats['min'])}-{_number(stats['max'])})"


def prepare_demo_data(opts) -> None:
    """Generate the demo's dataset before any timed run, so that no run pays for it."""
    from datasets.synthetic import ensure_synthetic_coco
    from main import parse_args
    args = parse_args(["-c", opts.config, "--coco_path", str(opts.coco_path)]
                      + (["--options", *opts.demo_options] if opts.demo_options else []))
    if args.dataset_file == "synthetic":
        ensure_synthetic_coco(args.coco_path, args.synthetic_num_train, args.synthetic_num_val,
                              args.synthetic_image_size, seed=0)


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def cpu_facts() -> dict:
    """What decides the demo's precision on this CPU, as its runs see it (they inherit this environment):
    torch's instruction set, bfloat16's measured slow-down, and any variable that lowers the instruction set."""
    from util.precision import NATIVE_AT_MOST, bfloat16_slowdown
    slowdown = bfloat16_slowdown()
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bfloat16_slowdown": slowdown,
            "bfloat16": "native" if slowdown <= NATIVE_AT_MOST else "emulated",
            "limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}}


def demo(opts) -> dict:
    progress(f"preparing the data in {opts.coco_path}")
    prepare_demo_data(opts)
    cpu = cpu_facts()
    with contextlib.ExitStack() as stack:
        trees = {"ours": ROOT}
        if opts.against:
            trees[opts.against] = stack.enter_context(revision_worktree(opts.against))[0]
        out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        runs = []
        for repeat, label in schedule(list(trees), opts.repeats):
            progress(f"demo training, {label}, repeat {repeat + 1} of {opts.repeats}")
            run = demo_run(label, trees[label], opts, out / f"{label.replace('/', '_')}-{repeat}")
            runs.append({"repeat": repeat, **run})
    print(f"# demo: {' '.join([opts.config, *(opts.demo_options or [])])}, {opts.threads} threads, {opts.repeats} "
          f"repeats in alternating order; seconds from each command's start until its log.txt showed the AP")
    limits = " ".join(f"{k}={v}" for k, v in cpu["limits"].items())
    print(f"# CPU: torch capability {cpu['capability']}{', limited by ' + limits if limits else ''}; bfloat16 "
          f"{cpu['bfloat16']} ({cpu['bfloat16_slowdown']:.1f}x float32's time in util.precision's probe)")
    print("| repeat | revision | " + " | ".join(f"AP {t} at s" for t in opts.targets) + " | final AP | wall s |")
    print("|---|---|" + "---|" * len(opts.targets) + "---|---|")
    for r in runs:
        reached = [_number(r["time_to_ap"][str(t)]) if r["time_to_ap"][str(t)] is not None else "not reached"
                   for t in opts.targets]
        final = _number(r["epochs"][-1]["ap"]) if r["epochs"] else "-"
        print(f"| {r['repeat'] + 1} | {r['revision']} | {' | '.join(reached)} | {final} | {_number(r['wall_s'])} |")
    rows = {f"time to AP {t}, s": lambda r, t=t: r["time_to_ap"][str(t)] for t in opts.targets}
    rows["final AP"] = lambda r: r["epochs"][-1]["ap"] if r["epochs"] else None
    rows["wall time of the run, s"] = lambda r: r["wall_s"]
    summaries = {what: {label: demo_summary([value(r) for r in runs if r["revision"] == label]) for label in trees}
                 for what, value in rows.items()}
    print()
    print("| what | " + " | ".join(f"{label} median (min-max)" for label in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for what, cells in summaries.items():
        print(f"| {what} | " + " | ".join(_cell(stats) for stats in cells.values()) + " |")
    return {"demo": {"config": opts.config, "options": opts.demo_options or [], "threads": opts.threads, "cpu": cpu,
                     "targets": opts.targets, "against": opts.against, "runs": runs, "summary": summaries}}


# ---------------------------------------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", "-c", dest="config", default=None,
                   help="model config (default: config/DINO/DINO_4scale.py; with --demo: the demo's)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides, as main.py's --options k=v")
    p.add_argument("--size", nargs=2, type=int, default=[320, 480], metavar=("H", "W"), help="image size")
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--runs", type=int, default=5, help="timed repeats of each measurement")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (OMP_NUM_THREADS of the demo runs)")
    p.add_argument("--against", default=None, metavar="REV", help="also time this git revision, e.g. c89fd32")
    p.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    p.add_argument("--demo", action="store_true", help="time the demo's training to the --targets APs")
    p.add_argument("--repeats", type=int, default=2, help="--demo: trainings per revision")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.65], help="--demo: bbox APs to time")
    p.add_argument("--demo_options", nargs="+", default=None, help="--demo: main.py --options for every run")
    p.add_argument("--coco_path", default=str(ROOT / "data" / "synthetic"), help="--demo: the dataset folder")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: time the tree at this root
    return p


def main(argv=None) -> None:
    opts = get_args_parser().parse_args(argv)
    opts.config = opts.config or (DEMO_CONFIG if opts.demo else "config/DINO/DINO_4scale.py")
    sys.path.insert(0, opts.worker or str(ROOT))
    if opts.worker:
        return worker_main(opts)
    try:
        if min(opts.runs, opts.repeats, opts.batch, opts.threads, *opts.size) < 1:
            raise BenchmarkError("--runs, --repeats, --batch, --threads and --size must be at least 1")
        if opts.against:
            resolve_revision(opts.against)  # fail before the measurements, not after
        results = demo(opts) if opts.demo else benchmark(opts)
    except (BenchmarkError, ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"benchmark.py: error: {e}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
