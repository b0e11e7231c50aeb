"""Train and evaluate DINO: `python main.py -c config/DINO/DINO_4scale.py --coco_path DIR --output_dir DIR`.

The story of a run: the command line and config (cli.py), a Trainer that sets everything up
(training/trainer.py), then training epoch after epoch, or only an evaluation with --eval. cli.run turns what
happened (--plan: only what it would do) into the exit code: 0 done, 1 a failure during training, 2 bad input, 3 stopped by a signal (state
saved: rerun the same command to continue)."""
import sys

import cli
from training.trainer import Trainer

get_args_parser = cli.get_args_parser
parse_args = cli.parse_args


def main(args) -> int:
    trainer = Trainer(args)
    if args.eval:
        return trainer.evaluate_weights()
    return trainer.plan() if args.plan else trainer.fit()


def run(argv=None) -> int:
    """main.py's command line, as a function (tools/run_with_submitit.py runs it in a SLURM job)."""
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(run())
