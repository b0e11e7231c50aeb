"""The plan of the chaos run: where the reference run was when (its progress events), and the kills aimed there."""
import random
from dataclasses import dataclass
from typing import List

from .events import label, position

WHERE = ("training", "a checkpoint write", "evaluation")


@dataclass
class Marker:
    position: tuple
    label: str
    window: float  # seconds the reference took from this event to its next progress event (evaluation: its result)


@dataclass
class Kill:
    where: str
    signal: str  # 'KILL' or 'TERM'
    group: bool
    workers: bool
    target: tuple  # the progress position to wait for
    label: str
    delay: float  # then seconds to wait (a checkpoint write: the first temporary file instead)


def reference_markers(records: List[dict]) -> List[Marker]:
    """The reference run's progress events, each with the time to its next one; an evaluation's ends at its
    `evaluated` event, so that a kill aimed at evaluation lands in it, not in the save after it."""
    progress = [record for record in records if position(record) is not None]
    markers = []
    for i, record in enumerate(progress):
        epoch, evaluation, _ = position(record)
        if evaluation:
            done = [r["time"] for r in records
                    if r["event"] == "evaluated" and r.get("epoch") == epoch and r["time"] >= record["time"]]
            end = done[0] if done else record["time"]
        else:
            end = progress[i + 1]["time"] if i + 1 < len(progress) else records[-1]["time"]
        markers.append(Marker(position(record), label(record), max(0.0, end - record["time"])))
    return markers


def plan_kills(count: int, rng: random.Random, markers: List[Marker], which: str, fallback_from) -> List[Kill]:
    """`count` kills rotating over where, signal, target and workers, sorted by when they land. When a
    numbered checkpoint appears before the last epoch (fallback_from), the last kill comes after it, so
    that the bit flip has a checkpoint to fall back to."""
    training = [m for m in markers if m.position[1] == 0]
    evaluation = [m for m in markers if m.position[1] == 1] or training
    kills = []
    for i in range(count):
        where = WHERE[i % 3]
        marker = rng.choice(evaluation if where == "evaluation" else training)
        delay = 0.0 if where == "a checkpoint write" else rng.random() * marker.window
        kills.append(Kill(where, which if which != "mixed" else ("KILL", "TERM")[i % 2], group=i % 4 in (1, 2),
                          workers=i % 4 in (0, 3), target=marker.position, label=marker.label, delay=delay))
    kills.sort(key=lambda k: k.target)
    later = [m for m in training if fallback_from is not None and m.position >= fallback_from]
    if kills and later and kills[-1].target < fallback_from:
        marker = rng.choice(later)
        kills[-1].target, kills[-1].label, kills[-1].where = marker.position, marker.label, "training"
        kills[-1].delay = rng.random() * marker.window
    return kills
