"""Look inside a checkpoint without training: where it stopped, its best AP, what differs from a config.

    python tools/inspect_checkpoint.py runs/demo/checkpoint.pth [-c config/DINO/DINO_demo.py]
    python tools/inspect_checkpoint.py CKPT --strip weights.pth            # model weights only
    python tools/inspect_checkpoint.py CKPT --safetensors model.safetensors
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint.format import CheckpointError, atomic_save, load_checkpoint  # noqa: E402
from checkpoint.resume import architecture_differences, hyperparameter_changes  # noqa: E402
from util.weights import strip_module_prefix  # noqa: E402
from util.config import load_config  # noqa: E402


def describe(checkpoint: dict) -> list:
    model = checkpoint["model"]
    unique = {v.data_ptr(): v for v in model.values() if hasattr(v, "data_ptr")}
    epoch, iteration = checkpoint.get("epoch"), checkpoint.get("iteration", 0)
    order = checkpoint.get("data_order") or {}
    where = "no training state (weights only)" if epoch is None else (
        f"epoch {epoch} completed" if not iteration else f"epoch {epoch + 1}, {iteration} iterations done")
    if iteration and "num_samples" in order:
        trains = order.get("epoch_samples") or order["num_samples"]
        left_out = f", the last {order['num_samples'] - trains} wait for the next epoch's order" \
            if trains < order["num_samples"] else ""
        where += (f" (epoch {epoch + 1}: {order['samples_done']} of {order['num_samples']} images done{left_out}, by "
                  f"{order['world_size']} process(es) x batch {order['batch_size']})")
    if checkpoint.get("eval_pending"):
        where += f"; epoch {epoch} is trained but not yet evaluated"
    lines = [f"position:       {where}",
             f"format:         version {checkpoint.get('format_version', 'official/unknown')}, "
             f"torch {checkpoint.get('torch_version', '?')}",
             f"integrity:      {_integrity(checkpoint.get('integrity'))}",
             f"model:          {len(model)} keys, {sum(v.numel() for v in unique.values()):,} values",
             f"contents:       {', '.join(sorted(k for k in checkpoint if k != 'integrity'))}"]
    for kind, best in sorted((checkpoint.get("best") or {}).items()):
        lines.append(f"best {kind + ':':<10}AP {best['ap']:.4f} at epoch {best['epoch']}")
    return lines


def _integrity(record) -> str:
    if record is None:
        return "no integrity record (an older or foreign file): only zip checksums were verified"
    return (f"verified: {len(record['members'])} records, {record['payload_bytes']:,} bytes, CRC-32 each; "
            f"config hash {record['config_hash']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("-c", "--config_file", help="list how the checkpoint's args differ from this config")
    parser.add_argument("--strip", metavar="OUT", help="write {'model': weights} only")
    parser.add_argument("--safetensors", metavar="OUT", help="export the model weights as safetensors")
    opts = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(opts.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(describe(checkpoint)))
    if opts.config_file:
        saved, cfg = checkpoint.get("args") or {}, load_config(opts.config_file)
        diffs = architecture_differences(saved, cfg) + hyperparameter_changes(saved, cfg)
        print("differences from the config:" if diffs else "no differences from the config in the checked keys")
        for d in diffs:
            print(f"  {d}")
    model = strip_module_prefix(checkpoint["model"])
    if opts.strip:  # what predicting and fine-tuning need: the weights, the architecture and the class names
        kept = {k: checkpoint[k] for k in ("args", "categories", "model_is_ema", "epoch") if k in checkpoint}
        atomic_save({"model": model, **kept}, opts.strip)
        print(f"wrote weights-only checkpoint {opts.strip}")
    if opts.safetensors:
        from safetensors.torch import save_file

        unique, seen = {}, set()
        for key, value in model.items():  # shared heads are one tensor under many names: store it once
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                unique[key] = value.contiguous()
        save_file(unique, opts.safetensors)
        print(f"wrote {len(unique)} tensors to {opts.safetensors} (shared heads stored once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
