"""Progress events (util/run_dir.py lists them all) as the tool aims its kills at them."""
from typing import Optional


def position(record: dict) -> Optional[tuple]:
    """Where a progress event stands, comparable in the order a run gets there: (epoch, 0, iteration) for a
    `step`, (epoch, 1, 0) for `evaluating`; None for any other event."""
    if record["event"] == "step":
        return record["epoch"], 0, record["iteration"]
    if record["event"] == "evaluating":
        return record["epoch"], 1, 0
    return None


def label(record: dict) -> str:
    """A progress event as the log shows it: 'Epoch 1 [4/8]' or 'Evaluating epoch 1'."""
    if record["event"] == "step":
        return f"Epoch {record['epoch']} [{record['iteration']}/{record['iterations']}]"
    return f"Evaluating epoch {record['epoch']}"
