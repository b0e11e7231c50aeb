"""Turn SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a request to save and stop at the next iteration boundary."""
import signal

import torch

from util import distributed as dist_utils

EXIT_INTERRUPTED = 3  # saved checkpoint.pth after a stop signal; rerun the same command to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

_state = {"signal": None, "previous": {}}


class TrainingInterrupted(Exception):
    """Raised after the state was saved because a stop signal arrived."""


def _handle(signum, _frame):
    # Only record: the training loop saves at the next iteration boundary (a handler must not do I/O).
    _state["signal"] = signum
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def install() -> None:
    """Take over the stop signals, remembering the handlers they had (submitit's, for instance)."""
    for sig in STOP_SIGNALS:
        _state["previous"][sig] = signal.signal(sig, _handle)


def received() -> str:
    return signal.Signals(_state["signal"]).name if _state["signal"] is not None else ""


def previous_handler(signum: int):
    """The handler `signum` had before install(), e.g. submitit's checkpoint-and-requeue on SIGUSR2."""
    return _state["previous"].get(signum)


def stop_requested(device="cpu") -> bool:
    """True on every rank as soon as any rank got a signal, so all ranks stop at the same iteration."""
    flag = torch.tensor([1.0 if _state["signal"] is not None else 0.0], device=device)
    return bool(dist_utils.all_reduce_sum(flag).item() > 0) if dist_utils.get_world_size() > 1 else bool(flag.item())
