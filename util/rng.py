"""Capture and restore every random number generator a training step draws from, as checkpointable values."""
import logging
import random
from typing import Dict

import numpy as np
import torch

logger = logging.getLogger('dino.rng')


def capture_rng_state() -> Dict[str, object]:
    """Every RNG a training step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, object]):
    """Undo capture_rng_state: later draws repeat the ones that followed the capture."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].cpu().numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    cuda_states = state.get('cuda', [])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != available:
        logger.warning("checkpoint has RNG state for %d CUDA device(s) but %d are visible; restoring the "
                       "first %d", len(cuda_states), available, min(len(cuda_states), available))
    for index, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)
