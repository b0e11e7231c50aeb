"""`python -m tools.chaos`: the command line (the package's docstring is its help)."""
import argparse
import sys
import tempfile
from pathlib import Path
from typing import List

import cli

from . import __doc__ as USAGE
from .series import Chaos, ChaosError, say


def parse(argv: List[str]):
    """The tool's options, and main.py's arguments: the rest, and everything after `--`."""
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--kills", type=int, default=20, help="how many times to kill the run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill instants, kinds and slots")
    parser.add_argument("--signal", choices=["KILL", "TERM", "mixed"], default="mixed",
                        help="SIGKILL, SIGTERM, or both alternately (default)")
    parser.add_argument("--nproc", type=int, choices=[1, 2], default=1, help="2: main.py under torchrun")
    parser.add_argument("--no_bit_flip", action="store_true", help="score the kills without flipping a bit")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where reference/, chaos/ and starts/ go (default: a new temporary directory)")
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, main_args = parser.parse_known_args(argv[:cut])
    main_args += argv[cut + 1:]
    if opts.kills < 0:
        raise ChaosError(f"--kills {opts.kills}: give 0 or more")
    try:
        parsed = cli.parse_args(main_args)
    except cli.BAD_INPUT as e:
        raise ChaosError(str(e)) from None
    for flag, value, why in (
            ("--output_dir", parsed.output_dir and not parsed.output_url,
             "the tool chooses WORKDIR/reference and WORKDIR/chaos (an object-store URL is taken)"),
            ("--no_auto_resume", parsed.no_auto_resume, "every rerun would start over"),
            ("--eval", parsed.eval, "there is no training to interrupt")):
        if value:
            raise ChaosError(f"{flag} cannot be passed to main.py here: {why}; drop it")
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    taken = [str(workdir / n) for n in ("reference", "chaos", "starts") if (workdir / n).exists()]
    if taken:
        raise ChaosError(f"{', '.join(taken)} already exist(s): choose another --workdir or remove them")
    return opts, main_args, parsed, workdir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chaos = None
    try:
        opts, main_args, parsed, workdir = parse(argv)
        chaos = Chaos(opts, main_args, parsed, workdir)
        chaos.reference()
        board = chaos.series()
    except ChaosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if chaos is not None:
            chaos.abandon()
        print("error: interrupted; the run in progress was killed", file=sys.stderr)
        return 130
    say(board.line())
    return 0 if board.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
