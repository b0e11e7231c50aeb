"""Small helpers shared by models, datasets and the engine: padded batches, collation, atomic writes."""
import os
from typing import Callable, IO, List, Optional

import torch
from torch import Tensor


class NestedTensor:
    """A padded image batch with its padding mask (True = padding), as in DETR."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Pad CHW images to the largest H and W of the batch; mask marks the padding."""
    channels = tensor_list[0].shape[0]
    max_h = max(t.shape[1] for t in tensor_list)
    max_w = max(t.shape[2] for t in tensor_list)
    batch = tensor_list[0].new_zeros((len(tensor_list), channels, max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=tensor_list[0].device)
    for img, pad_img, m in zip(tensor_list, batch, mask):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask)


def collate_fn(batch):
    """Collate (image, target) pairs into (NestedTensor, tuple of targets). An empty batch (a rank's share of
    an epoch's shortened last step, datasets/sampler.py) is an empty NestedTensor and no targets."""
    if not batch:
        return NestedTensor(torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool)), ()
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), targets


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path (and fsync the
    directory): a crash or an error at any instant leaves the old file or the complete new one, never a part.
    On error the temporary file is removed and the exception propagates."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable; directories cannot be fsynced elsewhere
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
