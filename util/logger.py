"""Human-readable logs: the console for rank 0, and every message also in output_dir/info.txt."""
import logging
import os
import sys


def setup_logging(output_dir: str, rank: int, debug: bool = False) -> logging.Logger:
    root = logging.getLogger("dino")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if rank != 0:
        root.addHandler(logging.NullHandler())
        return root
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if output_dir:
        file_handler = logging.FileHandler(os.path.join(output_dir, "info.txt"))
        file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    return root
