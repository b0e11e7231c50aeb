"""One run: set up, then train epoch after epoch (each saved, evaluated, saved again) or only evaluate.

The Trainer owns everything a run changes: the model and its optimizer, where training stands (a Progress,
training/progress.py), the checkpoint store (checkpoint/store.py) and the run's files. Where it starts is the
resume policy's (checkpoint/resume.py); what one optimizer step does, training/step.py's."""
import datetime
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler

from checkpoint import finetune, remote, resume
from checkpoint.format import CheckpointWriteError, load_checkpoint, plain_args, snapshot
from checkpoint.store import LATEST, CheckpointStore, best_name, numbered_name
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco import label_names
from datasets.sampler import GlobalBatchSampler, ShardedSampler
from engine import EpochPlan, Meters, NonFiniteOutputError, evaluate, train_one_epoch
from models import build_model, load_pretrained_backbone
from training.optim import (build_optimizer, build_scheduler, describe_schedule, position_scheduler,
                            steps_per_iteration)
from training.step import OutOfMemoryStop, StopInsideStep, TrainStep, linear_warmup, optimizer_steps_per_epoch
from training.watch import LossWatch, SampleRecord, early_stop
from util import distributed as dist_utils
from util import determinism, environment, faults, interrupt, precision, run_dir
from util.config import dump_config
from util.ema import build_ema
from util.logger import setup_logging
from util.misc import collate_fn
from util.rng import capture_rng_state

logger = logging.getLogger("dino.trainer")


class Trainer:
    """`Trainer(args)` sets the process up (determinism, the process group, output_dir, logging, precision,
    the datasets and the model); then `fit()` trains, or `evaluate_weights()` evaluates (--eval). Both return
    the exit code. `args` is not changed after set-up."""

    def __init__(self, args):
        self.args = args
        determinism_note = determinism.configure(args.deterministic)
        dist_utils.init_distributed_mode(args)
        self.store = CheckpointStore(args.output_dir, args.keep_checkpoints)
        if args.plan:  # --plan reads output_dir and writes nothing
            setup_logging("", dist_utils.get_rank(), args.debug)
        self._output_lock = None if args.plan else self._claim_output_dir()
        self.device = torch.device(args.device)
        self.precision = precision.choose(args.amp, args.amp_dtype, self.device.type)
        _seed_everything(args.seed + dist_utils.get_rank())
        self.run_record = {**environment.run_record(dist_utils.get_world_size()), "precision": self.precision.name}
        if dist_utils.is_main_process():
            self._write_header(determinism_note)
        self.dataset_val = build_dataset("val", args)  # both splits are checked before anything else takes time
        self.dataset_train = None if args.eval else build_dataset("train", args)
        self.base_ds = get_coco_api_from_dataset(self.dataset_val)
        self.label_names = label_names((self.dataset_train or self.dataset_val).categories(), args.num_classes,
                                       args.contiguous_category_ids)  # what the model's labels are: fine-tuning maps by them
        self.val_loader = _loader(self.dataset_val, args, sampler=BatchSampler(
            ShardedSampler(len(self.dataset_val), dist_utils.get_world_size(), dist_utils.get_rank()),
            args.batch_size, drop_last=False))
        self.model, self.criterion, self.postprocessors = build_model(args)
        self.model.to(self.device)
        dist_utils.broadcast_state([*self.model.parameters(), *self.model.buffers()])  # every process: rank 0's
        self.n_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("number of trainable parameters: %d (total %d)", self.n_parameters,
                    sum(p.numel() for p in self.model.parameters()))

    # ---------------------------------------------------------------------------------------------
    # Set-up

    def _claim_output_dir(self):
        """Rank 0 creates output_dir, locks it for this run and removes temporary files of saves a kill cut
        short; every rank fails together if the directory is busy. Then logging starts. Returns the lock, held
        until the process ends."""
        args, held, stale, error = self.args, None, [], None
        if args.output_dir and dist_utils.is_main_process():
            try:
                os.makedirs(os.path.join(args.output_dir, "eval"), exist_ok=True)
                held = run_dir.lock(args.output_dir)
                if args.output_url:
                    self.store.mirror = _mirror(args)
                stale = self.store.remove_stale_temporaries()
            except run_dir.OutputDirError as e:
                error = run_dir.OutputDirError(str(e).replace(args.output_dir, args.output_url or args.output_dir))
            except remote.RemoteError as e:
                error = run_dir.OutputDirError(str(e))
            except OSError as e:
                error = run_dir.OutputDirError(f"cannot write to --output_dir {args.output_dir} ({e.strerror or e}): "
                                               "free some space or choose another directory")
        if dist_utils.any_rank(error is not None):
            raise error or run_dir.OutputDirError(f"--output_dir {args.output_dir} cannot be used (rank 0 says why)")
        setup_logging(args.output_dir, dist_utils.get_rank(), args.debug)
        if stale:
            logger.info("Removed %d temporary file(s) of interrupted saves: %s", len(stale), ", ".join(stale))
        aborted = self.store.mirror.aborted if self.store.mirror is not None else []
        if aborted:
            logger.info("Aborted %d upload(s) that a kill left incomplete: %s", len(aborted), ", ".join(aborted))
        return held

    def _write_header(self, determinism_note: str) -> None:
        args, record, chosen = self.args, self.run_record, self.precision
        logger.info("command: %s", remote.redact(" ".join([sys.executable] + sys.argv)))
        logger.info("git: %s%s | world size: %d | device: %s | precision: %s", record["git_commit"],
                    " (with uncommitted changes)" if record["git_dirty"] else "", record["world_size"], args.device,
                    chosen.reason)
        if chosen.warning:
            logger.warning(chosen.warning)
        overrides = precision.float32_overrides(args)
        if overrides:
            logger.info("float32: the config's float32_recipe sets %s",
                        ", ".join(f"{key}={value}" for key, value in overrides.items()))
        logger.info(determinism_note)
        logger.info("environment: %s", json.dumps(record))
        logger.info("args: %s", json.dumps(plain_args(args), sort_keys=True, default=str))
        if args.output_dir and not args.plan:
            dump_config(args.config, os.path.join(args.output_dir, "config_cfg.py"))
            with open(os.path.join(args.output_dir, "config_args_all.json"), "w") as f:
                json.dump(plain_args(args), f, indent=2, sort_keys=True, default=str)
            run_dir.append_event(args.output_dir, "started", world_size=record["world_size"],
                                 precision=chosen.name, eval_only=bool(args.eval))

    def _prepare_training(self) -> None:
        """Where training starts, and everything the loop needs from there."""
        args = self.args
        start = resume.choose_start(args, self.store)
        self._build_loop(start)
        if start.kind == "scratch":
            self._initial_backbone()
        self.progress = resume.restore(start, self)
        self.store.best_written = {kind: dict(value) for kind, value in self.progress.best.items()}
        self.scheduler = build_scheduler(self.optimizer, args, self.iterations)  # the current config's schedule
        position_scheduler(self.scheduler, self.progress.scheduler_steps)
        self.step = TrainStep(self.model, self.criterion, self.optimizer, self.device,
                              amp_dtype=self.precision.dtype, scaler=self.scaler, max_norm=args.clip_max_norm,
                              ema=self.ema, scheduler=self.scheduler if steps_per_iteration(args) else None,
                              accumulate_steps=self.layout.accumulate_steps,
                              stop_requested=interrupt.stop_requested)
        self.losses = LossWatch(self.progress.recent_losses)
        self.sample_record = SampleRecord(args.output_dir) if args.record_sample_ids and args.output_dir else None
        self.tensorboard = self._tensorboard()
        if args.output_dir and dist_utils.is_main_process():
            pending = self.progress.pending
            run_dir.truncate_log(args.output_dir, pending["epoch"] if pending else self.progress.epoch)
            run_dir.append_event(args.output_dir, "start", how=start.kind, path=start.path, reason=start.why,
                                 run_id=start.run_id, epoch=self.progress.epoch, iteration=self.progress.iteration,
                                 pending=pending["epoch"] if pending else None)

    def _build_loop(self, start) -> None:
        """The loader, optimizer, scaler and EMA for the layout that `start` keeps."""
        args = self.args
        self.layout = resume.layout_for(start, args, len(self.dataset_train))
        self.train_sampler = GlobalBatchSampler(len(self.dataset_train), args.batch_size, args.seed,
                                                dist_utils.get_world_size(), dist_utils.get_rank(),
                                                self.layout.accumulate_steps)
        self.train_loader = _loader(self.dataset_train, args, sampler=self.train_sampler)
        self.iterations = optimizer_steps_per_epoch(len(self.train_loader), self.layout.accumulate_steps)
        self.optimizer = build_optimizer(self.model, args)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.needs_scaler else None
        self.ema = build_ema(self.model, args.ema_decay, args.ema_warmup_iters) if args.use_ema else None
        self.facts = {"origin": resume.run_origin(args), "run_id": start.run_id,
                      "categories": self.dataset_train.categories(), "environment": self.run_record,
                      "datasets": {"train": self.dataset_train.fingerprint(), "val": self.dataset_val.fingerprint()}}

    def plan(self) -> int:
        """--plan: where this command would start, what it would load and how its lr schedule runs from there;
        nothing is trained, and no file is written."""
        args = self.args
        start, why = resume.decide_start(args, self.store)
        if why and start.kind != "continue":
            logger.info("%s", why)
        self._build_loop(start)
        progress = resume.restore(start, self)
        if start.kind == "scratch":
            logger.info("The backbone would start from backbone_weights=%s", args.backbone_weights)
        saved = start.checkpoint.get("args") if start.kind in ("continue", "resume") else None
        logger.info("%s", describe_schedule(args, progress.epoch, self.iterations, saved))
        logger.info("--plan: nothing was trained and no file was written")
        return 0

    def _initial_backbone(self) -> None:
        """Training from scratch starts from backbone_weights (ImageNet, as the official recipe, or a local file).
        Frozen stages with random weights would never learn, so they are refused."""
        loaded = load_pretrained_backbone(self.model, self.args.backbone_weights)
        if loaded:
            logger.info(loaded)
            return
        frozen = [n for n, p in self.model.backbone.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"backbone_freeze_at={self.args.backbone_freeze_at} freezes backbone stages whose "
                             f"weights are random ({len(frozen)} tensors, e.g. {frozen[0]}), since neither "
                             "backbone_weights nor a checkpoint gives them: set backbone_weights=imagenet (or a "
                             "local file), or backbone_freeze_at=0 to train the whole backbone")

    def _tensorboard(self):
        if not (self.args.use_tensorboard and self.args.output_dir and dist_utils.is_main_process()):
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(self.args.output_dir, "tb"), purge_step=self.progress.epoch)

    # ---------------------------------------------------------------------------------------------
    # The run

    def evaluate_weights(self) -> int:
        """--eval: the weights of --resume or --pretrain_model_path, never an auto-resumed checkpoint."""
        args = self.args
        source = args.resume or args.pretrain_model_path
        if not source:
            raise ValueError("--eval needs weights: pass --resume CHECKPOINT or --pretrain_model_path CHECKPOINT")
        checkpoint = load_checkpoint(source)
        report, classes = resume.load_weights(self.model, source, checkpoint, args, self.label_names)
        logger.info("Evaluating the %s weights of %s:\n%s", "EMA" if checkpoint.get("model_is_ema") else "model",
                    source, report.format())
        if classes:
            logger.info("%s", classes.format())
        finetune.check_shapes(report, source, resume.architecture_differences(checkpoint.get("args") or {}, vars(args)))
        if args.plan:
            logger.info("--plan: nothing was evaluated and no file was written")
            return 0
        results = os.path.join(args.output_dir, "eval", "results.json") if args.save_results and args.output_dir \
            else None
        stats, _ = evaluate(self.model, self.criterion, self.postprocessors, self.val_loader, self.base_ds,
                            self.device, results_file=results, amp_dtype=self.precision.dtype,
                            label_to_category_id=self._label_map(), max_iters=10 if args.debug else None,
                            backend=args.coco_eval_backend)
        if args.output_dir and dist_utils.is_main_process():
            with open(os.path.join(args.output_dir, "eval", "eval_stats.json"), "w") as f:
                json.dump({f"test_{k}": v for k, v in stats.items()}, f)
            run_dir.append_event(args.output_dir, "evaluated", epoch=None, ap=stats["coco_eval_bbox"][0])
        logger.info("bbox AP %.4f  AP50 %.4f", stats["coco_eval_bbox"][0], stats["coco_eval_bbox"][1])
        if args.output_dir and dist_utils.is_main_process():
            self.store.flush()
        return 0

    def fit(self) -> int:
        """Train from where the resume policy says to the last epoch (or an early stop)."""
        self._prepare_training()
        interrupt.install()
        progress, args = self.progress, self.args
        if progress.pending:
            logger.info("Epoch %d was trained but not evaluated: evaluating it first", progress.pending["epoch"])
            self._evaluate_pending()
        if progress.epoch < args.epochs:
            logger.info("Start training: epochs %d..%d, %d iterations per epoch", progress.epoch, args.epochs - 1,
                        self.iterations)
        started = time.time()
        while progress.epoch < args.epochs and not early_stop(args.early_stop_patience, progress.best,
                                                               progress.epoch - 1, args.epochs):
            self._train_epoch()
            self._evaluate_pending()
        self.finish()
        seconds = time.time() - started
        logger.info("Training time %s", datetime.timedelta(seconds=int(seconds)))
        if args.output_dir and dist_utils.is_main_process():
            run_dir.append_event(args.output_dir, "finished", seconds=round(seconds, 1), epoch=progress.epoch - 1)
            self.store.flush()
        return 0

    def _train_epoch(self) -> None:
        """Train progress.epoch from where it stands; saved before it is evaluated (as DINO and DETR do), so a
        crash or a kill during a long evaluation loses no training."""
        progress, sampler, epoch = self.progress, self.train_sampler, self.progress.epoch
        started = time.time()
        sampler.set_epoch(epoch)
        sampler.set_start(progress.samples_done, progress.epoch_samples)
        progress.epoch_samples = sampler.epoch_samples
        start_iter = progress.samples_done // sampler.step_samples
        meters = Meters(progress.meters if progress.samples_done else None)
        progress.completed_step(start_iter, progress.samples_done, meters.state(), None)
        warmup = linear_warmup(self.args.lr_warmup_iters, epoch * self.iterations)
        try:
            plan = EpochPlan(start_iter, sampler.steps_left(), sampler.ends_short(), 10 if self.args.debug else None)
            train_one_epoch(self.step, self.train_loader, epoch, plan, meters, self._after_step, warmup,
                            log_progress=self.args.save_log)
        except StopInsideStep:
            self.save([LATEST], wait=True)
            self._stop(f"epoch {epoch}", f"saved {self._saved_where()} at iteration {progress.iteration}, the "
                       "start of the step under way")
        except Exception as e:
            self._save_before_failure(e)
            raise
        if not steps_per_iteration(self.args):
            self.scheduler.step()
        progress.next_epoch(meters.state(), time.time() - started)
        self.save([LATEST])

    def _after_step(self, it: int, meters: Meters, targets: list) -> None:
        """After each optimizer step: record it, save when it is time or a stop signal came."""
        progress, args = self.progress, self.args
        samples_done = min(progress.samples_done + self.train_sampler.step_samples, progress.epoch_samples)
        progress.completed_step(it, samples_done, meters.state(), capture_rng_state())
        self.losses.add(meters.last["loss"])
        progress.recent_losses = self.losses.recent
        if self.sample_record is not None:
            self.sample_record.write(progress.epoch, targets)
        if args.output_dir and dist_utils.is_main_process() and it % max(1, self.iterations // 10) == 0:
            run_dir.append_event(args.output_dir, "step", epoch=progress.epoch, iteration=it,
                                 iterations=self.iterations, loss=meters.last["loss"])
        faults.pause("after_step")
        stop = interrupt.stop_requested()
        if stop or (args.save_every_iters > 0 and it % args.save_every_iters == 0 and it < self.iterations):
            self.save([LATEST], wait=stop)
        if stop:
            self._stop(f"epoch {progress.epoch}", f"saved {self._saved_where()} at iteration {it}")

    def _evaluate_pending(self) -> None:
        """Evaluate the epoch trained last (saved already), log it, keep the best, save again."""
        progress, args = self.progress, self.args
        epoch = progress.pending["epoch"]
        logger.info("Evaluating epoch %d", epoch)
        if args.output_dir and dist_utils.is_main_process():
            run_dir.append_event(args.output_dir, "evaluating", epoch=epoch)
        eval_started = time.time()
        results = os.path.join(args.output_dir, "eval", f"results{epoch:04d}.json") \
            if args.save_results and args.output_dir else None
        test_stats, ema_stats = self._evaluate_models(epoch, results)
        log_stats = {**{f"train_{k}": v for k, v in Meters(progress.pending["train_meters"]).averages().items()},
                     **{f"test_{k}": v for k, v in test_stats.items()}}
        candidates = [("regular", test_stats)]
        if ema_stats is not None:
            log_stats.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
            candidates.append(("ema", ema_stats))
        new_best = []
        for kind, stats in candidates:
            ap = stats["coco_eval_bbox"][0]
            if ap > progress.best.get(kind, {}).get("ap", -1.0):
                progress.best[kind] = {"ap": ap, "epoch": epoch}
                new_best.append(best_name(kind))
        log_stats.update(epoch=epoch, n_parameters=self.n_parameters,
                         epoch_time=progress.pending["train_time"] + time.time() - eval_started)
        self._record_epoch(log_stats, test_stats, ema_stats)
        progress.pending = None
        names = new_best + [LATEST]
        if (epoch + 1) % args.save_checkpoint_interval == 0:
            names.append(numbered_name(epoch))
        self.save(names)
        kept = progress.best.get("regular")  # none when the disk had no room for the first best file
        logger.info("Epoch %d done in %.0f s: bbox AP %.4f (%s)", epoch, log_stats["epoch_time"],
                    test_stats["coco_eval_bbox"][0],
                    f"best {kept['ap']:.4f} at epoch {kept['epoch']}" if kept else "no best file kept")

    def _evaluate_models(self, epoch: int, results_file):
        """(the weights' stats, the EMA's or None). Each process evaluates its share with rank 0's batch-norm
        statistics, those a checkpoint holds. A diverged model puts checkpoint.pth back at the last good state."""
        ema_model = self.ema.module if self.ema is not None else None
        dist_utils.broadcast_state([*self.model.buffers(), *(self.ema.buffers() if self.ema is not None else ())])
        kwargs = dict(amp_dtype=self.precision.dtype, label_to_category_id=self._label_map(),
                      max_iters=10 if self.args.debug else None, after_batch=self._after_eval_batch,
                      backend=self.args.coco_eval_backend)
        try:
            test_stats, _ = evaluate(self.model, self.criterion, self.postprocessors, self.val_loader, self.base_ds,
                                     self.device, results_file=results_file, **kwargs)
            ema_stats = evaluate(ema_model, self.criterion, self.postprocessors, self.val_loader, self.base_ds,
                                 self.device, **kwargs)[0] if ema_model is not None else None
        except NonFiniteOutputError as e:
            diverged = NonFiniteOutputError(f"epoch {epoch}: {e}; {self._back_to_last_good(epoch)}")
            diverged.__dict__.update(vars(e))  # which process met it
            raise diverged from None
        return test_stats, ema_stats

    def _after_eval_batch(self) -> None:
        faults.pause("eval_batch")
        if interrupt.stop_requested():
            epoch = self.progress.pending["epoch"]
            self.finish()  # the save before this evaluation is complete
            self._stop(f"the evaluation of epoch {epoch}",
                       f"{LATEST} holds epoch {epoch}'s training, which a rerun evaluates first")

    def _record_epoch(self, log_stats: dict, test_stats: dict, ema_stats) -> None:
        """log.txt (one JSON line per epoch), eval/latest.json, events.jsonl and TensorBoard."""
        epoch, out = log_stats["epoch"], self.args.output_dir
        if self.tensorboard is not None:
            for key, value in log_stats.items():
                if isinstance(value, dict):  # per-class AP: a curve per class that has ground truth
                    for name, v in value.items():
                        if v is not None:
                            self.tensorboard.add_scalar(f"{key}/{name}", v, epoch)
                    continue
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values[:3]):  # AP, AP50, AP75 of the COCO stats
                    self.tensorboard.add_scalar(key if len(values) == 1 else f"{key}/{i}", v, epoch)
            self.tensorboard.flush()
        if out and dist_utils.is_main_process():
            run_dir.append_log(out, log_stats)
            with open(os.path.join(out, "eval", "latest.json"), "w") as f:
                json.dump({"epoch": epoch, "coco_eval_bbox": test_stats["coco_eval_bbox"]}, f)
            run_dir.append_event(out, "evaluated", epoch=epoch, ap=test_stats["coco_eval_bbox"][0],
                                 ema_ap=ema_stats["coco_eval_bbox"][0] if ema_stats else None)

    # ---------------------------------------------------------------------------------------------
    # Saving and stopping

    def save(self, names, wait: bool = False) -> None:
        """Save where training stands to `names`. Every rank contributes its RNG state (that of the last
        completed step); rank 0 writes. A failed write (this one with wait=True, else the previous one) makes
        every rank raise together, so none waits for a partner that stopped."""
        rng = dist_utils.all_gather_object(self.progress.rng or capture_rng_state())
        error, best = None, None
        if dist_utils.is_main_process() and self.args.output_dir:
            try:
                best = self.store.save(snapshot(self._state(rng)), names, wait)
            except CheckpointWriteError as e:
                error = e
        if dist_utils.any_rank(error is not None):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint (its log says why)")
        if any(name.startswith("checkpoint_best_") for name in names):  # rank 0 may have kept the previous best
            self.progress.best = dist_utils.broadcast_object(best if best is not None else self.progress.best)

    def _state(self, rng_states: list) -> dict:
        """Everything a checkpoint needs to continue exactly (`facts`: the run's fixed records: 'origin', its
        starting point; 'categories', so a checkpoint alone names what it detects; 'environment'; 'datasets')."""
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'lr_scheduler': self.scheduler.state_dict(), 'iterations_per_epoch': self.iterations,
                 'args': plain_args(self.args), **self.facts,
                 **self.progress.to_state(self.layout, rng_states), 'torch_version': str(torch.__version__)}
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        if self.ema is not None:
            state['ema_model'] = self.ema.state_dict()
        return state

    def finish(self) -> None:
        """Wait for the last write; its failure is every rank's."""
        error = None
        if dist_utils.is_main_process():
            try:
                self.store.wait()
            except CheckpointWriteError as e:
                error = e
        if dist_utils.any_rank(error is not None):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint (its log says why)")

    def _save_before_failure(self, error: Exception) -> None:
        """A training step raised (a data error, a CUDA error, a bug): save the last completed step, so the rerun
        continues from there. Parameters change only in the optimizer step, after which the step counts as done,
        so this state is never half-updated. Several processes save together only when they learned of the
        failure together (util.distributed.check_together): each then stands after the same step."""
        together = dist_utils.get_world_size() == 1 or hasattr(error, "rank") or isinstance(error, OutOfMemoryStop)
        if (not together or isinstance(error, (FloatingPointError, CheckpointWriteError, interrupt.TrainingInterrupted))
                or not self.args.output_dir or self.progress.rng is None):
            return
        try:
            self.save([LATEST], wait=True)
        except CheckpointWriteError as e:
            logger.error("could not save the state before the failure: %s", e)
            return
        logger.warning("a training step failed after epoch %d iteration %d: saved %s with that iteration's state; "
                       "rerun the same command to continue once the cause is fixed", self.progress.epoch,
                       self.progress.iteration, self._saved_where())

    def _saved_where(self) -> str:
        """checkpoint.pth as the user named its place, and how long its upload took (a remote output_dir)."""
        mirror = self.store.mirror
        return self.store.display(LATEST) + (f" (uploaded in {mirror.pushed_seconds:.1f} s)" if mirror else "")

    def _back_to_last_good(self, epoch: int) -> str:
        """checkpoint.pth back at the newest evaluated state after `epoch` diverged (CheckpointStore); every rank
        learns what a rerun does."""
        self.finish()
        message = None
        if dist_utils.is_main_process() and self.args.output_dir:
            message = self.store.back_to_last_good(epoch)
        return dist_utils.broadcast_object(message) or "nothing was saved (no --output_dir)"

    def _stop(self, where: str, saved: str) -> None:
        """Log what a stop signal did, truthfully, then end the run with exit code 3."""
        signal_name = interrupt.received() or "a stop signal on another process"
        if self.args.output_dir:
            logger.warning("%s received during %s: %s; rerun the same command to continue", signal_name, where, saved)
            if dist_utils.is_main_process():
                run_dir.append_event(self.args.output_dir, "stopped", signal=signal_name, where=where, saved=saved,
                                     epoch=self.progress.epoch, iteration=self.progress.iteration)
        else:
            logger.warning("%s received during %s: nothing was saved (no --output_dir)", signal_name, where)
        raise interrupt.TrainingInterrupted()

    def _label_map(self):
        return getattr(self.dataset_val, "label_to_category_id", None)


def _mirror(args) -> remote.Mirror:
    """The object store behind a remote output_dir: reachable, held by this run alone (a lease), and its run's
    files pulled into the staging folder before anything decides where training starts."""
    mirror = remote.Mirror(args.output_url, args.output_dir)
    mirror.check()
    mirror.acquire(float(os.environ.get("DINO_LEASE_SECONDS", 60)))
    mirror.abort_incomplete_uploads()
    mirror.pull()
    return mirror


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _loader(dataset, args, sampler):
    """Loaders get their own generator: creating an iterator must not draw from the global RNG that training
    uses, or a resumed run would diverge. Augmentation is seeded per (epoch, index)."""
    loader = interrupt.StopSafeDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                          num_workers=args.num_workers, generator=torch.Generator())
    if len(loader) == 0:
        train = isinstance(sampler, GlobalBatchSampler)
        raise ValueError(f"the {'training' if train else 'validation'} set has {len(dataset)} images, fewer than "
                         f"one batch of {args.batch_size} per process: lower batch_size")
    return loader
