"""Turn SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a request to save and stop at the next iteration boundary."""
import atexit
import gc
import multiprocessing
import signal

from torch.utils.data import DataLoader

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


def stop_requested() -> bool:
    """True on every rank as soon as any rank got a signal, so all ranks stop at the same iteration."""
    return dist_utils.any_rank(_state["signal"] is not None)


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose workers never die of a stop signal: SLURM, `timeout` and torchrun signal the whole
    process group, and a dead worker would turn a clean save-and-stop into a crash. The signals are blocked
    while the workers start (a fork keeps the mask; torch's worker set-up would otherwise die of SIGTERM before
    any worker_init_fn runs), and each worker ignores them before unblocking: stopping is the main process's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=_ignore_stop_signals, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_stop_signals(_worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _end_leftover_workers() -> None:
    """multiprocessing ends daemon children at exit with SIGTERM and then waits for them; workers ignore
    SIGTERM, so one still running (its loader was not shut down, e.g. after an error) would be waited for
    forever. Loaders that an error left behind are shut down first (their workers exit cleanly); any worker
    still there holds nothing worth keeping and is ended for good."""
    gc.collect()
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as failed workers
    for child in leftover:
        child.kill()
