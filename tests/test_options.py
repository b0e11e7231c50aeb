"""Every numeric option is range-checked from one table before any work: a bad value is one error line."""
import json
import subprocess
import sys

from runner import DEMO, ROOT, TINY_OPTIONS
from util import options

# main.run once per key, in one process (importing torch for each would take minutes): each bad value must
# end in exit code 2 with its one error line, before output_dir exists.
CLI_LOOP = """
import contextlib, io, json, sys
sys.path.insert(0, {root!r})
import main
results = {{}}
for key, value, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main.run(argv)
    results[key] = [value, code, err.getvalue()]
print(json.dumps(results))
"""


def _bad_value(rule):
    """A value just outside the rule (or NaN for a number), in --options syntax."""
    if rule.integer:
        return str(int(rule.low) - 1)
    return "nan" if rule.low == 0 and not rule.low_open else f"{rule.low:g}" if rule.low_open else f"{rule.low - 1:g}"


LIST_KEYS = {"lr_drop_list", "data_aug_scales", "data_aug_scales2_resize", "data_aug_scales2_crop"}


def test_every_numeric_option_is_checked_before_any_work(tmp_path):
    out = tmp_path / "out"
    base = ["-c", DEMO, "--coco_path", str(tmp_path / "data"), "--output_dir", str(out)]
    runs = []
    for key, rule in options.RULES.items():
        bad = _bad_value(rule)
        if key in ("seed", "num_workers"):  # command-line flags
            runs.append([key, bad, base + [f"--{key}", bad, "--options", *TINY_OPTIONS]])
        else:
            bad = f"[{bad}]" if key in LIST_KEYS else bad
            runs.append([key, bad, base + ["--options", *TINY_OPTIONS, f"{key}={bad}"]])
    proc = subprocess.run([sys.executable, "-c", CLI_LOOP.format(root=str(ROOT)), json.dumps(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(options.RULES)
    for key, (value, code, err) in results.items():
        rule = options.RULES[key]
        line = err.strip().splitlines()[-1] if err.strip() else ""
        assert code == 2, (key, value, err)
        assert line.startswith(f"error: {key}=") and line.endswith(f": {rule.allowed()} ({rule.meaning})"), line
    assert not out.exists()  # nothing was touched


def test_the_help_and_the_options_page_show_the_table():
    assert options.table() in (ROOT / "docs" / "options.md").read_text()
    help_text = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    for key, rule in options.RULES.items():
        assert f"{key}" in help_text and f"{rule.allowed()}: {rule.meaning}" in help_text.replace("\n", " "), key


def test_a_rule_allows_what_it_says():
    lr, steps, temperature = options.RULES["lr"], options.RULES["accumulate_steps"], options.RULES["pe_temperatureH"]
    assert lr.allows(1e-4) and lr.allows(1.0) and lr.allows(0) and not lr.allows(float("nan"))
    assert not lr.allows(2.0) and not lr.allows(-1e-4) and not lr.allows(True) and not lr.allows("0.1")
    assert steps.allows(1) and not steps.allows(0) and not steps.allows(2.0)
    assert temperature.allows(20) and not temperature.allows(0)
    assert lr.allowed() == "a number in [0, 1]" and steps.allowed() == "an integer in [1, 65536]"
    assert temperature.allowed() == "a number > 0"
