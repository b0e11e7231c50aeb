"""The one place that knows about processes: initialisation (torchrun, SLURM, submitit) and small collectives."""
import logging
import os
import pickle
import subprocess
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("dino.distributed")


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist_avail_and_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is True on at least one: ranks agree before one of them raises."""
    if not is_dist_avail_and_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def all_reduce_max(value: int) -> int:
    if not is_dist_avail_and_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class RankFailed(RuntimeError):
    """Another process of the run failed (its error could not be sent as it is): the message is its error."""


def check_together(error: Optional[BaseException], retryable=lambda e: False) -> bool:
    """Call where every process passes, with the error this process met since the last such point (or None).
    Returns True when some processes failed and all of those failures are retryable (all retry together);
    raises on every process when any failed otherwise: the error of the first process that failed, so that
    no process waits in a collective for one that stopped. Its `rank` attribute names that process."""
    status = 0 if error is None else 1 if retryable(error) else 2
    if not is_dist_avail_and_initialized():
        if status == 2:
            raise error
        return status == 1
    worst = all_reduce_max(status)
    if worst < 2:
        return worst == 1
    errors = all_gather_object(_sendable(error) if status == 2 else None)
    rank = next(r for r, e in enumerate(errors) if e is not None)
    failure = error if rank == get_rank() else errors[rank]
    failure.rank = rank
    raise failure


def _sendable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (all_gather_object pickles), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RankFailed(f"{type(error).__name__}: {error}")


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_state(tensors) -> None:
    """Rank 0's values of these tensors (parameters, buffers) on every rank, in place: what DDP does when it
    wraps a model (parameters and buffers) and before each step's first forward (buffers)."""
    tensors = list(tensors)
    if get_world_size() < 2 or not tensors:
        return
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # one broadcast per dtype, as DDP's buckets
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        for tensor, value in zip(group, flat.split([t.numel() for t in group])):
            tensor.data.copy_(value.view_as(tensor))


def all_gather_object(obj) -> list:
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def average_gradients(parameters) -> None:
    """What DDP does after a backward, for a step it did not take part in: every trainable parameter's
    gradient averaged over ranks (a rank that computed none adds zeros)."""
    params = [p for p in parameters if p.requires_grad]
    world_size = get_world_size()
    if world_size < 2 or not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def reduce_dict(values: dict, average: bool = True) -> dict:
    """Sum (or average) a dict of scalar tensors over ranks, in a fixed key order."""
    world_size = get_world_size()
    if world_size < 2:
        return values
    keys = sorted(values)
    stacked = all_reduce_sum(torch.stack([values[k].detach().float() for k in keys]))
    if average:
        stacked = stacked / world_size
    return dict(zip(keys, stacked))


def _first_slurm_host(nodelist: str) -> str:
    return subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()[0]


def _environment_ranks():
    """(rank, world_size, local_rank) from torchrun or SLURM, or None for a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return None


def leave_process_group() -> None:
    """Ends this process's part in the process group after a run that ended well: a process that exits with
    gloo or NCCL still set up can abort in their teardown ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed_mode(args) -> None:
    """Sets args.distributed, args.rank, args.world_size, args.gpu and joins the process group if needed."""
    ranks = _environment_ranks()
    if ranks is None:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, None
        return
    args.rank, args.world_size, args.gpu = ranks
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    logger.info("distributed init: rank %d of %d (local %d), backend %s", args.rank, args.world_size,
                args.gpu, args.dist_backend)
    barrier()
