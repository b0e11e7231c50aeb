"""Run main.py training as a SLURM job (or locally) through submitit, surviving preemption and time limits.

    python tools/run_with_submitit.py --ngpus 8 --nodes 2 --timeout 2880 --job_dir logs/%j \
        -c config/DINO/DINO_4scale.py --coco_path /data/coco

Every main.py argument is accepted. On preemption or timeout, submitit signals the job (SIGUSR2): training
saves checkpoint.pth at the next iteration boundary, the job requeues itself and auto-resumes from there.
"""
import argparse
import signal
import sys
from pathlib import Path

import submitit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main as dino_main  # noqa: E402
from util import interrupt  # noqa: E402


def launcher_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The launcher's own options; everything else goes to main.py unchanged."""
    parser = argparse.ArgumentParser("Submit DINO training through submitit", add_help=add_help, allow_abbrev=False)
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (= processes) per node")
    parser.add_argument("--nodes", default=1, type=int, help="number of nodes")
    parser.add_argument("--timeout", default=2880, type=int, help="job time limit in minutes")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--job_dir", default="logs/%j", help="job folder (%%j = job id); default output_dir")
    parser.add_argument("--job_name", default="dino", help="SLURM job name")
    parser.add_argument("--mem_gb", default=None, type=int, help="memory per node in GB")
    parser.add_argument("--cpus_per_task", default=10, type=int, help="CPUs per process (data loading workers)")
    parser.add_argument("--requeue", action="store_true", help="let SLURM requeue the job after a node failure")
    parser.add_argument("--signal_delay_s", default=120, type=int,
                        help="seconds before the time limit at which the job is told to save and requeue")
    parser.add_argument("--mail_user", default=None, help="address for SLURM mail")
    parser.add_argument("--mail_type", default=None, help="SLURM mail events, e.g. END,FAIL")
    parser.add_argument("--slurm_additional", nargs="*", default=[], metavar="KEY=VALUE",
                        help="any other sbatch option, e.g. constraint=volta32gb exclude=node12")
    parser.add_argument("--cluster", default=None, choices=["local", "debug", "slurm"],
                        help="submitit executor; default: slurm when sbatch exists, else local")
    return parser


def get_parser() -> argparse.ArgumentParser:
    """Launcher options plus every main.py argument, for --help and validation."""
    return argparse.ArgumentParser("Submit DINO training through submitit", allow_abbrev=False,
                                   parents=[launcher_parser(), dino_main.get_args_parser(False)])


class Trainer:
    """The submitted callable. submitit pickles it; checkpoint() hands a fresh one to the requeued job."""

    def __init__(self, main_argv, requeues: int = 0):
        self.main_argv = list(main_argv)
        self.requeues = requeues

    def __call__(self) -> int:
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        job = submitit.JobEnvironment()
        argv = [a.replace("%j", str(job.job_id).split("_")[0]) for a in self.main_argv]
        if self.requeues and dist_env.rank == 0:
            print(f"requeue {self.requeues}: rerunning the same command, which continues the run", flush=True)
        code = dino_main.run(argv)
        # After a stop signal the state is saved (exit code 3). SIGUSR2 is submitit's preemption/timeout notice:
        # let it do the rest (checkpoint() + requeue + exit). Other signals (scancel, scontrol requeue) end this run.
        requeue = interrupt.previous_handler(signal.SIGUSR2)
        if code == interrupt.EXIT_INTERRUPTED and interrupt.received() == "SIGUSR2" and callable(requeue):
            requeue(signal.SIGUSR2, None)
        if code not in (0, interrupt.EXIT_INTERRUPTED):
            raise RuntimeError(f"main.py ended with exit code {code}: its error line above says why")
        return code

    def checkpoint(self):
        return submitit.helpers.DelayedSubmission(Trainer(self.main_argv, self.requeues + 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = get_parser().parse_args(argv)
    _, main_argv = launcher_parser().parse_known_args(argv)
    if not opts.output_dir:
        main_argv += ["--output_dir", opts.job_dir]
    executor = submitit.AutoExecutor(folder=opts.job_dir, cluster=opts.cluster, slurm_max_num_timeout=30)
    if executor.cluster == "slurm":
        executor.update_parameters(slurm_signal_delay_s=opts.signal_delay_s)
    additional = dict(item.split("=", 1) for item in opts.slurm_additional)
    if opts.mail_user:
        additional.update(mail_user=opts.mail_user, mail_type=opts.mail_type or "END,FAIL")
    if opts.requeue:
        additional["requeue"] = True
    use_gpus = executor.cluster == "slurm" and opts.device != "cpu"
    executor.update_parameters(
        name=opts.job_name, timeout_min=opts.timeout, nodes=opts.nodes, tasks_per_node=opts.ngpus,
        gpus_per_node=opts.ngpus if use_gpus else 0, cpus_per_task=opts.cpus_per_task,
        **({"mem_gb": opts.mem_gb} if opts.mem_gb else {}),
        **({"slurm_partition": opts.partition} if opts.partition else {}),
        **({"slurm_qos": opts.qos} if opts.qos else {}),
        **({"slurm_additional_parameters": additional} if additional else {}))
    job = executor.submit(Trainer(main_argv))
    print(f"Submitted job {job.job_id}; logs in {opts.job_dir.replace('%j', str(job.job_id))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
