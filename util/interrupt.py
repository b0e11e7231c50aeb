"""Turn SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a request to save and stop at the next iteration boundary."""
import logging
import signal

import torch

from util import distributed as dist_utils

logger = logging.getLogger("dino.interrupt")

EXIT_INTERRUPTED = 3  # saved checkpoint.pth after a stop signal; rerun the same command to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

_requested = {"signal": None}


class TrainingInterrupted(Exception):
    """Raised after the state was saved because a stop signal arrived."""


def _handle(signum, _frame):
    if _requested["signal"] is None:
        logger.warning("received %s: saving at the next iteration boundary, then stopping",
                       signal.Signals(signum).name)
    _requested["signal"] = signum
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def install() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)


def request_stop(signum: int = signal.SIGUSR2) -> None:
    """What a signal does, for callers that are told to stop another way (e.g. submitit's checkpoint())."""
    _handle(signum, None)


def stop_requested(device="cpu") -> bool:
    """True on every rank as soon as any rank got a signal, so all ranks stop at the same iteration."""
    flag = torch.tensor([1.0 if _requested["signal"] is not None else 0.0], device=device)
    return bool(dist_utils.all_reduce_sum(flag).item() > 0) if dist_utils.get_world_size() > 1 else bool(flag.item())
