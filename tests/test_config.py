"""Config files: inheritance, --options parsing and merging, dumping, and the errors users will hit."""
import argparse
import textwrap

import pytest

from util.config import DictAction, dump_config, load_config, merge_config


def _write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def _parser():
    parser = argparse.ArgumentParser()
    parser.add_argument('--config_file', '-c')
    parser.add_argument('--options', nargs='+', action=DictAction)
    parser.add_argument('--lr', type=float, default=1e-4)
    return parser


def _parse(*argv):
    parser = _parser()
    return parser.parse_args(list(argv)), {action.dest for action in parser._actions}


def test_base_inheritance_two_levels(tmp_path):
    _write(tmp_path / 'base' / 'root.py', """
        import math
        num_classes = 91
        matcher = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
        scales = [480, 512]
        _private = 'skipped'
        def helper():
            return 1
        """)
    _write(tmp_path / 'base' / 'mid.py', """
        _base_ = 'root.py'
        matcher = dict(cost_bbox=4.0, focal=dict(alpha=0.25))
        dn_number = 100
        """)
    child = _write(tmp_path / 'dino.py', """
        _base_ = ['base/mid.py']
        num_classes = 3
        matcher = dict(focal=dict(gamma=2.0))
        """)
    assert load_config(child) == {
        'num_classes': 3,
        'matcher': {'cost_class': 2.0, 'cost_bbox': 4.0, 'cost_giou': 2.0, 'focal': {'alpha': 0.25, 'gamma': 2.0}},
        'scales': [480, 512],
        'dn_number': 100,
    }


def test_bases_merge_in_order(tmp_path):
    _write(tmp_path / 'a.py', "x = 1\ny = 'a'\n")
    _write(tmp_path / 'b.py', "y = 'b'\n")
    child = _write(tmp_path / 'c.py', "_base_ = ['a.py', 'b.py']\n")
    assert load_config(child) == {'x': 1, 'y': 'b'}


@pytest.mark.parametrize('text, expected', [
    ('1', 1),
    ('-3', -3),
    ('0.5', 0.5),
    ('1e-4', 1e-4),
    ('True', True),
    ('false', False),
    ('None', None),
    ('coco', 'coco'),
    ('[1,2]', [1, 2]),
    ('[]', []),
    ('a,b', ['a', 'b']),
    ('800,1333', [800, 1333]),
    ('(1,2)', (1, 2)),
    ('(1,)', (1,)),
    ('[[1,2],(3,[4,5])]', [[1, 2], (3, [4, 5])]),
    ('(1,2),(3,4)', [(1, 2), (3, 4)]),
    ('/data/coco', '/data/coco'),
])
def test_options_coercion(text, expected):
    args, _ = _parse('--options', f'key={text}')
    value = args.options['key']
    assert value == expected and type(value) is type(expected)
    if isinstance(value, (list, tuple)):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_options_dotted_and_repeated():
    args, _ = _parse('--options', 'matcher.cost_bbox=3', 'matcher.focal.alpha=0.5', 'epochs=12',
                     '--options', 'dn_number=50')
    assert args.options == {'matcher': {'cost_bbox': 3, 'focal': {'alpha': 0.5}}, 'epochs': 12, 'dn_number': 50}


@pytest.mark.parametrize('item, message', [('novalue', 'expected KEY=VALUE'), ('key=[1,2', 'unbalanced brackets')])
def test_options_malformed(capsys, item, message):
    with pytest.raises(SystemExit):
        _parse('--options', item)
    assert message in capsys.readouterr().err


def test_merge_config_applies_options(tmp_path):
    path = _write(tmp_path / 'cfg.py', """
        epochs = 12
        matcher = dict(cost_bbox=5.0, cost_giou=2.0)
        """)
    args, dests = _parse('-c', str(path), '--options', 'epochs=24', 'matcher.cost_bbox=3.0')
    merge_config(args, load_config(path), args.options, dests)
    assert args.epochs == 24 and args.matcher == {'cost_bbox': 3.0, 'cost_giou': 2.0} and args.lr == 1e-4


def test_merge_config_unknown_option_suggests(tmp_path):
    path = _write(tmp_path / 'cfg.py', "lr_drop = 11\nmatcher = dict(cost_bbox=5.0)\n")
    cfg = load_config(path)
    args, dests = _parse('-c', str(path), '--options', 'lr_dorp=20')
    with pytest.raises(ValueError, match=r"'lr_dorp'.*did you mean 'lr_drop'"):
        merge_config(args, cfg, args.options, dests)
    args, dests = _parse('--options', 'matcher.cost_bboxx=1')
    with pytest.raises(ValueError, match=r"'matcher.cost_bboxx'.*did you mean 'matcher.cost_bbox'"):
        merge_config(args, cfg, args.options, dests)
    args, dests = _parse('--options', 'lr_drop.x=1')
    with pytest.raises(ValueError, match=r"'lr_drop' to be a dict"):
        merge_config(args, cfg, args.options, dests)


def test_merge_config_collision(tmp_path):
    path = _write(tmp_path / 'cfg.py', "lr = 2e-4\nepochs = 12\n")
    args, dests = _parse('-c', str(path))
    with pytest.raises(ValueError, match=r"config key 'lr' in .*cfg.py collides with the command-line argument --lr"):
        merge_config(args, load_config(path), None, dests)


def test_dump_load_round_trip(tmp_path):
    cfg = {
        'num_classes': 91, 'lr': 1e-4, 'name': "it's \"quoted\"\n", 'use_dn': True, 'pretrained': None,
        'scales': [480 + 32 * i for i in range(40)], 'sizes': (800, 1333), 'one': (1,), 'empty': [],
        'matcher': {'cost': {'bbox': 5.0, 'giou': 2.0}, 1: 'int key'}, 'nested': [[1, (2, 3)], {'a': [None]}],
    }
    path = tmp_path / 'out' / 'config_args.py'
    path.parent.mkdir()
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ['config_args.py']


def test_dump_rejects_unloadable_values(tmp_path):
    with pytest.raises(ValueError, match="'max_norm'"):
        dump_config({'max_norm': float('inf')}, tmp_path / 'cfg.py')
    with pytest.raises(ValueError, match="'class'"):
        dump_config({'class': 1}, tmp_path / 'cfg.py')
    assert not list(tmp_path.iterdir())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.py'):
        load_config(tmp_path / 'missing.py')
    with pytest.raises(FileNotFoundError, match='nowhere.py'):
        load_config(_write(tmp_path / 'child.py', "_base_ = 'nowhere.py'\n"))
    with pytest.raises(ValueError, match=r'broken.py, line 3'):
        load_config(_write(tmp_path / 'broken.py', "a = 1\nb = 2\nc = [1,\n"))
    with pytest.raises(ValueError, match=r"'device'.*\bset\b"):
        load_config(_write(tmp_path / 'bad_value.py', "device = {'cuda'}\n"))
    with pytest.raises(ValueError, match=r"'sizes\[1\]'.*range"):
        load_config(_write(tmp_path / 'bad_nested.py', "sizes = [1, range(3)]\n"))
    with pytest.raises(ValueError, match='circular'):
        load_config(_write(tmp_path / 'loop.py', "_base_ = 'loop.py'\n"))
