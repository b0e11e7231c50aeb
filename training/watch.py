"""What watches a run beside training: the losses around a resume, early stopping, the record of trained samples."""
import logging
import os

from util import distributed as dist_utils

logger = logging.getLogger("dino.watch")


class LossWatch:
    """The last training losses, kept in checkpoints, so that the first losses after a resume can be set beside
    the last ones before the interruption: a resume that went wrong shows as a jump beyond the usual noise."""

    KEEP, COMPARE = 50, 10
    ENOUGH = 5  # fewer losses before the resume show no noise to judge a jump by

    def __init__(self, before: list):
        self.before, self.recent, self.after = list(before), list(before), []

    def add(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.KEEP:]
        if len(self.before) >= self.ENOUGH and len(self.after) < self.COMPARE:
            self.after.append(loss)
            if len(self.after) == min(self.COMPARE, len(self.before)):
                self._report()

    def _report(self) -> None:
        mean_before = sum(self.before) / len(self.before)
        spread = (sum((x - mean_before) ** 2 for x in self.before) / max(len(self.before) - 1, 1)) ** 0.5
        mean_after = sum(self.after) / len(self.after)
        line = (f"after the resume, the first {len(self.after)} losses average {mean_after:.4f}; the last "
                f"{len(self.before)} before it averaged {mean_before:.4f} (standard deviation {spread:.4f})")
        if abs(mean_after - mean_before) > 3 * spread / len(self.after) ** 0.5 + 1e-6 * abs(mean_before):
            logger.warning("%s: a jump beyond the loss noise; check that the resume restored what you expect", line)
        else:
            logger.info(line)


def early_stop(patience: int, best: dict, last_epoch: int, epochs: int) -> bool:
    """early_stop_patience=N ends training after N evaluated epochs without a better bbox AP. It is derived from
    the best AP's epoch, which every checkpoint holds, so a resumed run stops where an uninterrupted one would."""
    best_epoch = best.get("regular", {}).get("epoch")
    if patience <= 0 or best_epoch is None or last_epoch - best_epoch < patience:
        return False
    logger.info("Early stop: bbox AP has not improved for %d epochs (best %.4f at epoch %d); training ends after "
                "epoch %d of %d", last_epoch - best_epoch, best["regular"]["ap"], best_epoch, last_epoch, epochs)
    return True


class SampleRecord:
    """record_sample_ids=True: every process appends each step's image ids to output_dir/sample_ids/rank{R}.txt,
    a record that checks which images each epoch trained on, across interruptions and process counts."""

    def __init__(self, output_dir: str):
        os.makedirs(os.path.join(output_dir, "sample_ids"), exist_ok=True)
        self.file = open(os.path.join(output_dir, "sample_ids", f"rank{dist_utils.get_rank()}.txt"), "a")

    def write(self, epoch: int, targets: list) -> None:
        self.file.write(f"{epoch} " + " ".join(str(int(t["image_id"])) for t in targets) + "\n")
        self.file.flush()
