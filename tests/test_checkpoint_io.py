"""Checkpoint I/O: atomic writes, safe and well-explained loads, partial weight loading, RNG state."""
import argparse
import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint import format as checkpoint_module
from util import weights
from checkpoint.format import CheckpointError, CheckpointWriteError, atomic_save, load_checkpoint
from util.rng import capture_rng_state, restore_rng_state
from util.weights import load_model_weights, strip_module_prefix


def _state_dict():
    return {'layer.weight': torch.arange(6.).reshape(2, 3), 'layer.bias': torch.zeros(2)}


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    atomic_save({'model': _state_dict(), 'epoch': 3}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['epoch'] == 3 and torch.equal(ckpt['model']['layer.weight'], _state_dict()['layer.weight'])
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    atomic_save({'model': _state_dict(), 'epoch': 1}, path)
    before = path.read_bytes()

    real_atomic_write = checkpoint_module.atomic_write

    def disk_full(target, write):
        def half(f):
            f.write(b'PK\x03\x04 half a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_atomic_write(target, half)

    monkeypatch.setattr(checkpoint_module, 'atomic_write', disk_full)
    with pytest.raises(CheckpointWriteError, match='the disk is full') as info:
        atomic_save({'model': _state_dict(), 'epoch': 2}, path)
    assert str(path) in str(info.value) and 'no space left on device' in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_load_missing_and_empty(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist') as info:
        load_checkpoint(tmp_path / 'nope.pth')
    assert str(tmp_path / 'nope.pth') in str(info.value)
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'empty \(0 bytes\)'):
        load_checkpoint(tmp_path / 'empty.pth')


def test_load_truncated(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': {'w': torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt.*cut off.*use an earlier checkpoint') as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert '\n' not in str(info.value)


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('content', [b'hello, this is a text file\n', bytes(range(256)) * 4, b'\x80' + bytes(99)],
                         ids=['text', 'bytes', 'pickle-header'])
def test_load_garbage(tmp_path, content):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a (readable )?PyTorch checkpoint') as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


class _Payload:
    """Pickles as a call that creates a marker file when unpickled."""

    def __init__(self, marker, use_shell):
        self.marker, self.use_shell = str(marker), use_shell

    def __reduce__(self):
        if self.use_shell:
            return os.system, (f"touch '{self.marker}'",)
        return open, (self.marker, 'w')


@pytest.mark.parametrize('use_shell', [True, False])
def test_load_refuses_malicious_pickle(tmp_path, use_shell):
    control = tmp_path / 'control'
    pickle.loads(pickle.dumps(_Payload(control, use_shell)))
    assert control.exists(), 'the payload should work when unpickled without protection'

    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'model': _state_dict(), 'extra': _Payload(marker, use_shell)}, path)
    with pytest.raises(CheckpointError, match='refused to load .*nothing from it was executed') as info:
        load_checkpoint(path)
    assert ('system' if use_shell else 'open') in str(info.value)
    assert not marker.exists()


def test_load_refuses_unknown_class(tmp_path):
    path = tmp_path / 'object.pth'
    torch.save({'model': _state_dict(), 'note': _Payload('unused', False).__class__}, path)
    with pytest.raises(CheckpointError, match='of type .*_Payload that is not allowed'):
        load_checkpoint(path)


def test_load_official_style_checkpoint(tmp_path):
    path = tmp_path / 'checkpoint0011_4scale.pth'
    torch.save({'model': _state_dict(), 'args': argparse.Namespace(lr=1e-4, num_classes=91), 'epoch': 11}, path)
    ckpt = load_checkpoint(path)
    assert ckpt['args'] == {'lr': 1e-4, 'num_classes': 91}
    assert ckpt['epoch'] == 11 and set(ckpt['model']) == {'layer.weight', 'layer.bias'}


def test_load_bare_state_dict_and_non_checkpoints(tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save(_state_dict(), path)
    assert set(load_checkpoint(path)) == {'model'}
    for obj in ([1, 2, 3], {'epoch': 3, 'optimizer': {}}, {}):
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match='not a model checkpoint'):
            load_checkpoint(path)


def test_strip_module_prefix():
    assert list(strip_module_prefix({'module.a.b': 1, 'c.module.d': 2})) == ['a.b', 'c.module.d']


class _Detector(nn.Module):
    """A tiny model with DINO-like parts: a classifier per decoder layer, shared under a second name."""

    def __init__(self, num_classes, with_extra=False):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.class_embed = nn.ModuleList(nn.Linear(4, num_classes) for _ in range(2))
        self.decoder_class_embed = self.class_embed
        self.label_enc = nn.Embedding(num_classes + 1, 4)
        if with_extra:
            self.extra = nn.Linear(4, 2)


def test_load_model_weights_report():
    source = _Detector(num_classes=91)
    state_dict = {'module.' + k: v for k, v in source.state_dict().items()}
    state_dict['module.old_head.weight'] = torch.zeros(3)
    model = _Detector(num_classes=3, with_extra=True)

    report = load_model_weights(model, state_dict, ignore_patterns=('label_enc', 'no_such_key'))

    assert sorted(report.loaded) == ['backbone.bias', 'backbone.weight']
    assert report.ignored == ['label_enc.weight']
    assert ('class_embed.0.weight', (91, 4), (3, 4)) in report.shape_mismatch
    assert len(report.shape_mismatch) == 8  # 2 layers x (weight, bias) x 2 names
    assert sorted(report.missing) == ['extra.bias', 'extra.weight']
    assert report.unexpected == ['old_head.weight']
    assert report.unused_patterns == ['no_such_key']
    assert torch.equal(model.backbone.weight, source.backbone.weight)

    text = report.format()
    assert 'shape mismatch' in text and 'old_head.weight' in text and 'extra.weight' in text
    assert 'WARNING' in text and 'no_such_key' in text


@pytest.mark.parametrize('source_classes', [3, 5])
def test_load_model_weights_shared_tensor_under_one_name(source_classes):
    source = _Detector(num_classes=source_classes)
    state_dict = {k: v for k, v in source.state_dict().items() if not k.startswith('decoder_class_embed')}
    model = _Detector(num_classes=3)
    report = load_model_weights(model, state_dict, ignore_patterns=['label_enc'])
    assert report.missing == [] and report.unexpected == []
    if source_classes == 3:
        assert report.shape_mismatch == []
        assert torch.equal(model.decoder_class_embed[1].weight, source.class_embed[1].weight)
    else:
        expected = [f'class_embed.{i}.{name}' for i in '01' for name in ('bias', 'weight')]
        assert sorted(k for k, _, _ in report.shape_mismatch) == expected


def test_summarize_keys_groups_long_lists():
    keys = [f'transformer.decoder.layers.{i}.{name}' for i in range(6) for name in 'abcdefghi']
    keys += ['transformer.decoder.norm.weight', 'transformer.decoder.norm.bias']
    summary = weights.summarize_keys(keys)
    assert len(summary) <= 8
    assert 'transformer.decoder.layers.0.* (9 keys)' in summary
    assert weights.summarize_keys(keys + [f'backbone.{i}' for i in range(300)])[0] == 'transformer.* (56 keys)'
    assert weights.summarize_keys(['a', 'b']) == ['a', 'b']


def _draws():
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draws()

    path = tmp_path / 'rng.pth'
    atomic_save({'rng': state}, path)
    loaded = torch.load(path, weights_only=True)['rng']
    _draws()
    restore_rng_state(loaded)
    assert _draws() == expected


def test_a_flipped_bit_anywhere_is_caught_and_the_integrity_record_says_what_the_file_is(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    atomic_save({'model': {'w': torch.randn(300, 300)}, 'epoch': 4, 'iteration': 7, 'args': {'lr': 0.1},
                 'format_version': 2}, path)
    record = load_checkpoint(path)['integrity']
    assert (record['epoch'], record['iteration'], record['format_version']) == (4, 7, 2)
    assert len(record['config_hash']) == 16 and record['payload_bytes'] > 300 * 300 * 4
    data = path.read_bytes()
    for where in (0.2, 0.5, 0.8):  # inside the tensor data, where torch.load itself notices nothing
        flipped = bytearray(data)
        flipped[int(len(data) * where)] ^= 0x01
        (tmp_path / 'flipped.pth').write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match='is damaged: its record .* does not match its checksum'):
            load_checkpoint(tmp_path / 'flipped.pth')
