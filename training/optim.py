"""The optimizer and the lr schedule, and putting a fresh schedule where a resumed run stands."""
import argparse
import warnings

import torch


def build_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW with two groups, as the official code: the backbone (lr_backbone) and the rest (lr)."""
    def is_backbone(name):
        return any(k in name for k in args.lr_backbone_names)
    params = [{"params": [p for n, p in model.named_parameters() if not is_backbone(n) and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if is_backbone(n) and p.requires_grad],
               "lr": args.lr_backbone}]
    # fused: one kernel for all parameters instead of a dozen small ops per tensor (15% of a CPU demo step)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def build_scheduler(optimizer, args, iterations_per_epoch: int):
    """Stepped once per epoch, except onecycle: once per iteration (steps_per_iteration)."""
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    if args.lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_drop_list)
    if args.lr_scheduler == "onecycle":
        max_lr = [args.lr, args.lr_backbone]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=args.epochs,
                                                   steps_per_epoch=iterations_per_epoch, pct_start=0.2)
    raise ValueError(f"lr_scheduler must be step, multistep or onecycle; got {args.lr_scheduler!r}")


def steps_per_iteration(args) -> bool:
    return args.lr_scheduler == "onecycle"


def scheduler_steps_before(epoch: int, iterations_per_epoch: int, args) -> int:
    """How often the schedule has stepped when `epoch` begins."""
    return epoch * (iterations_per_epoch if steps_per_iteration(args) else 1)


def position_scheduler(scheduler, steps: int) -> None:
    """Put a fresh schedule where an uninterrupted run would be after `steps` steps: the same float
    operations in the same order, so the lr is bit-identical."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()": intended
        for _ in range(steps):
            scheduler.step()


def lr_at(args, epoch: int, iterations_per_epoch: int) -> float:
    """The lr (of the transformer's group) at the start of `epoch` under args' schedule."""
    groups = [{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": args.lr_backbone}]
    optimizer = torch.optim.SGD(groups, lr=args.lr)
    scheduler = build_scheduler(optimizer, args, iterations_per_epoch)
    position_scheduler(scheduler, scheduler_steps_before(min(epoch, args.epochs), iterations_per_epoch, args))
    return optimizer.param_groups[0]["lr"]


def describe_schedule(args, epoch: int, iterations_per_epoch: int, saved_args=None) -> str:
    """Where the lr schedule stands at `epoch` and how it goes on, in words; saved_args: the checkpoint's, to
    say what a changed schedule does to a resumed run."""
    lr = lr_at(args, epoch, iterations_per_epoch)
    text = f"lr schedule {args.lr_scheduler}: lr {lr:.3g} at epoch {epoch}"
    if args.lr_scheduler in ("step", "multistep"):
        drops = range(args.lr_drop, args.epochs, args.lr_drop) if args.lr_scheduler == "step" else \
            sorted(d for d in args.lr_drop_list if d < args.epochs)
        passed, coming = [d for d in drops if d <= epoch], [d for d in drops if d > epoch]
        text += f", after the drop{'s' if len(passed) > 1 else ''} at epoch {', '.join(map(str, passed))}" if passed \
            else ""
        text += f"; x0.1 at epoch {', '.join(map(str, coming))}" if coming else "; no drop before the end"
    text += f"; trains to epoch {args.epochs - 1}"
    saved = saved_args or {}
    if saved.get("lr_scheduler") == args.lr_scheduler and saved.get("epochs") not in (None, args.epochs):
        text += f" (the checkpoint's run planned {saved['epochs']} epochs)"
        if args.lr_scheduler == "onecycle":
            before = lr_at(argparse.Namespace(**{**vars(args), "epochs": saved["epochs"]}), epoch, iterations_per_epoch)
            text += (f"; onecycle lays its cycle out anew over {args.epochs} epochs, so the lr here is {lr:.3g} "
                     f"instead of {before:.3g}")
    if args.lr_warmup_iters and epoch == 0:
        text += f"; linear warm-up over the first {args.lr_warmup_iters} steps"
    return text
