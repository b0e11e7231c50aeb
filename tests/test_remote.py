"""An output_dir on an object store: a local S3 server (moto's, over HTTP) stands in for the bucket, and main.py
and the tools run against it end to end."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from runner import ROOT, TINY_OPTIONS, popen_main, run_main, wait_for_event

s3fs = pytest.importorskip("s3fs", reason="the object-store extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto's S3 server (moto[server]) is not installed")

KEYS = {"AWS_ACCESS_KEY_ID": "AKIATESTKEY0123456789", "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-record",
        "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A moto S3 server on a free port, for this module's tests; its address goes to s3fs through fsspec's
    FSSPEC_S3_ENDPOINT_URL, credentials through the usual AWS variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**KEYS, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "DINO_LEASE_SECONDS": "6"}
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"env": env, "proc": proc, "port": port}
    proc.terminate()
    proc.wait(timeout=30)


def _fs(server):
    return s3fs.S3FileSystem(key=KEYS["AWS_ACCESS_KEY_ID"], secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": server["env"]["FSSPEC_S3_ENDPOINT_URL"]})


def _bucket(server, name):
    fs = _fs(server)
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def _env(server, machine):
    """The environment of a process on `machine`: its own staging folder, as on another computer."""
    return {**server["env"], "DINO_STAGING_DIR": str(machine)}


def _fetch(fs, url, to, name):
    to.mkdir(parents=True, exist_ok=True)
    fs.get_file(f"{url[5:]}/{name}", str(to / name))
    return to / name


def test_chaos_on_the_store_every_start_on_a_new_machine(data, server, tmp_path):
    """tools/chaos with --output_dir s3://...: killed runs continue on new machines (empty staging folders) and
    end bit-identical to an uninterrupted local run; the bucket records no credential."""
    fs = _bucket(server, "runs")
    proc = subprocess.run([sys.executable, "-m", "tools.chaos", "--kills", "2", "--seed", "3", "--workdir",
                           str(tmp_path / "work"), "-c", "config/DINO/DINO_demo.py", "--output_dir", "s3://runs/chaos",
                           "--options", *TINY_OPTIONS, "epochs=2", "save_every_iters=3", "--", "--coco_path",
                           str(data), "--no-amp", "--num_workers", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, env={**os.environ, **server["env"]})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "every start on a new machine, output_dir s3://runs/chaos" in proc.stdout
    assert re.fullmatch(r"kills survived 2/2, resume failures 0, corrupt files 0, bit flips caught (\d)/\1, final "
                        r"state identical: yes", proc.stdout.strip().splitlines()[-1]), proc.stdout[-3000:]
    names = {path.rsplit("/", 1)[1] for path in fs.find("runs/chaos")}
    assert {"info.txt", "events.jsonl", "config_args_all.json", "log.txt", "checkpoint.pth"} <= names
    assert ".lease.json" not in names  # released at the end
    recorded = b"".join(fs.cat_file(p) for p in fs.find("runs/chaos"))
    assert KEYS["AWS_SECRET_ACCESS_KEY"].encode() not in recorded and KEYS["AWS_ACCESS_KEY_ID"].encode() not in recorded


def _staging(machine):
    """The staging folder of the only run on `machine`."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = [p for p in machine.glob("*") if p.is_dir() and p.name != "downloads"] if machine.exists() else []
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no staging folder in {machine}")


def _log(fs, url):
    return [json.loads(line) for line in fs.cat_file(f"{url[5:]}/log.txt").decode().splitlines()]


def test_a_stop_signal_waits_for_the_upload_and_says_where_the_state_is(data, server, tmp_path):
    _bucket(server, "runs")
    url = "s3://runs/stopped"
    proc = popen_main(data, url, options=["epochs=3"], env=_env(server, tmp_path / "a"))
    wait_for_event(proc, _staging(tmp_path / "a"), "step", epoch=0, iteration=3)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, output[-3000:]
    assert f"received during epoch 0: saved {url}/checkpoint.pth (uploaded in " in output
    checkpoint = torch.load(_fetch(_fs(server), url, tmp_path / "fetched", "checkpoint.pth"), weights_only=True)
    assert checkpoint["iteration"] >= 3


def test_a_second_run_on_the_same_remote_output_dir_is_refused(data, server, tmp_path):
    _bucket(server, "runs")
    url = "s3://runs/busy"
    first = popen_main(data, url, options=["epochs=50"], env=_env(server, tmp_path / "a"))
    wait_for_event(first, _staging(tmp_path / "a"), "start")
    second = run_main(data, url, options=["epochs=50"], env=_env(server, tmp_path / "b"), check=False)
    first.kill()
    first.communicate()
    assert second.returncode == 2, second.stdout[-2000:]
    assert f"error: {url} is in use by another run (pid {first.pid} on " in second.stdout.strip().splitlines()[-1]


def test_a_damaged_remote_checkpoint_falls_back_to_the_newest_intact_one(data, server, tmp_path):
    fs = _bucket(server, "runs")
    url = "s3://runs/damaged"
    run_main(data, url, options=["epochs=2"], env=_env(server, tmp_path / "a"))
    blob = fs.cat_file("runs/damaged/checkpoint.pth")
    fs.pipe_file("runs/damaged/checkpoint.pth", blob[: len(blob) // 2])  # a truncated object
    fs.call_s3("create_multipart_upload", Bucket="runs", Key="damaged/checkpoint0001.pth")  # one a kill cut short
    rerun = run_main(data, url, options=["epochs=3"], env=_env(server, tmp_path / "b"))
    assert "Aborted 1 upload(s) that a kill left incomplete: checkpoint0001.pth" in rerun.stdout
    assert not [u for u in fs.list_multipart_uploads("runs") if u["Key"].startswith("damaged/")]
    assert "checkpoint.pth is truncated or corrupt" in rerun.stdout
    assert "auto-resume fell back to checkpoint0001.pth" in rerun.stdout
    assert "Continuing the interrupted run in s3://runs/damaged" in rerun.stdout
    assert [e["epoch"] for e in _log(fs, url)] == [0, 1, 2]


def test_the_store_stopping_mid_run_ends_with_what_is_safe_where(data, tmp_path):
    """A server of its own, stopped after the first epoch: the next upload fails after its retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        own = {"env": {**KEYS, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}}
        time.sleep(2)
        _bucket(own, "runs")
        proc = popen_main(data, "s3://runs/outage", options=["epochs=3"], env=_env(own, tmp_path / "a"))
        wait_for_event(proc, _staging(tmp_path / "a"), "step", epoch=1, iteration=2)
        moto.kill()
        output = proc.communicate(timeout=180)[0]
    finally:
        moto.kill()
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: could not upload s3://runs/outage/"), last
    assert "s3://runs/outage/checkpoint.pth still holds the previous save" in last and "on this machine" in last


def test_unsupported_urls_and_missing_buckets_are_refused_at_start(data, server, tmp_path):
    for url, message in (("foo://bucket/run", "foo:// is not a storage fsspec knows"),
                         ("s3://no-such-bucket/run", "the bucket no-such-bucket does not exist")):
        proc = run_main(data, url, env=_env(server, tmp_path / "a"), check=False)
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert proc.stdout.strip().splitlines()[-1].startswith(f"error: --output_dir {url}: {message}")
        assert not (ROOT / "foo:").exists() and not (ROOT / "s3:").exists()  # no local folder named like the URL


def test_resume_and_the_tools_read_checkpoints_from_the_store(data, server, tmp_path):
    _bucket(server, "runs")
    url = "s3://runs/source"
    env = _env(server, tmp_path / "a")
    run_main(data, url, options=["epochs=1"], env=env)
    tuned = run_main(data, tmp_path / "tuned", "--resume", f"{url}/checkpoint.pth", "--finetune_ignore",
                     "class_embed", options=["epochs=2"], env=env)
    assert f"Loaded model weights only from {url}/checkpoint.pth (--finetune_ignore)" in tuned.stdout
    inspected = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", f"{url}/checkpoint.pth"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env})
    assert inspected.returncode == 0 and "epoch 0" in inspected.stdout, inspected.stdout[-2000:]
    plotted = subprocess.run([sys.executable, "tools/plot_logs.py", url, "--out", str(tmp_path / "curves.png")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **env})
    assert plotted.returncode == 0 and (tmp_path / "curves.png").exists(), plotted.stdout[-2000:]
    predicted = subprocess.run([sys.executable, "tools/predict.py", "--checkpoint", f"{url}/checkpoint.pth", "--images",
                                str(data / "val2017"), "--out", str(tmp_path / "predictions")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    assert predicted.returncode == 0, predicted.stdout[-2000:]
    assert len(list((tmp_path / "predictions").iterdir())) >= len(list((data / "val2017").iterdir()))


def test_two_processes_move_to_a_new_machine_with_their_records(data, server, tmp_path):
    """torchrun, 2 processes, output_dir on the store, TensorBoard and the sample-id record on: stopped by a
    SIGTERM to the job on machine a, continued on machine b (an empty staging folder) to the end. The bucket
    then holds one log line per epoch, TensorBoard's files and both processes' records, by which each image
    of each epoch was trained exactly once."""
    fs = _bucket(server, "runs")
    url = "s3://runs/two"

    def torchrun(machine):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", "-c",
               "config/DINO/DINO_demo.py", "--coco_path", str(data), "--output_dir", url, "--num_workers", "0",
               "--save_log", "--no-amp", "--options", *TINY_OPTIONS, "synthetic_num_train=16", "epochs=3",
               "record_sample_ids=True", "use_tensorboard=True"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                             **_env(server, machine)})

    first = torchrun(tmp_path / "a")
    wait_for_event(first, _staging(tmp_path / "a"), "step", epoch=1, iteration=1)
    os.killpg(first.pid, signal.SIGTERM)
    output = first.communicate(timeout=240)[0]
    assert "SIGTERM received during epoch 1: saved s3://runs/two/checkpoint.pth (uploaded in" in output, output[-3000:]

    last = torchrun(tmp_path / "b")
    output = last.communicate(timeout=300)[0]
    assert last.returncode == 0, output[-4000:]
    assert "Continuing the interrupted run in s3://runs/two" in output
    assert [e["epoch"] for e in _log(fs, url)] == [0, 1, 2]
    assert fs.find("runs/two/tb"), "no TensorBoard file in the bucket"
    trained = {}
    for rank in (0, 1):
        for line in fs.cat_file(f"runs/two/sample_ids/rank{rank}.txt").decode().splitlines():
            epoch, *ids = map(int, line.split())
            trained.setdefault(epoch, []).extend(ids)
    assert {epoch: sorted(ids) for epoch, ids in trained.items()} == {e: list(range(1, 17)) for e in range(3)}


def test_a_store_that_cannot_be_reached_or_refuses_the_credentials_stops_the_start(data, tmp_path):
    """No server at the address (botocore's own retries off, so ours are timed), and a server that checks
    credentials (moto with authentication on) that does not know ours: exit 2 and one line that says what
    to check; no staging folder is left with files in it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = {"env": {**KEYS, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}}
    proc = run_main(data, "s3://runs/far", env=_env(nowhere, tmp_path / "a"), check=False)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert last.startswith("error: --output_dir s3://runs/far: could not list s3://runs/far after 4 attempt(s):"), last
    assert last.endswith("check the network and the store's address (an endpoint setting), then rerun; nothing was "
                         "trained or written"), last

    strict = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        time.sleep(3)
        proc = run_main(data, "s3://runs/far", env=_env({"env": {**nowhere["env"], "AWS_MAX_ATTEMPTS": "3"}},
                                                        tmp_path / "b"), check=False)
    finally:
        strict.kill()
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert last.startswith("error: --output_dir s3://runs/far: could not list s3://runs/far: permission denied"), last
    assert last.endswith("check the credentials this machine uses for the store; nothing was trained or written")
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file() and p.suffix == ".pth"]


def test_a_long_upload_shows_its_progress(caplog):
    """An upload that lasts past PROGRESS_SECONDS logs how far it is, at most one line per interval; a short
    one logs nothing. fsspec's backends report the bytes sent to this callback."""
    from checkpoint.remote import PROGRESS_SECONDS, UploadProgress

    now = [0.0]
    progress = UploadProgress("s3://runs/big/checkpoint.pth", clock=lambda: now[0])
    progress.set_size(400 * 2**20)
    caplog.set_level("INFO", logger="dino.remote")
    for _ in range(40):  # 10 MB every second
        now[0] += 1
        progress.relative_update(10 * 2**20)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 40 // PROGRESS_SECONDS, lines
    assert lines[0] == "uploading s3://runs/big/checkpoint.pth: 25% of 400 MB, 10.0 MB/s, about 30 s left"
    caplog.clear()
    quick = UploadProgress("s3://runs/big/log.txt", clock=lambda: now[0])
    quick.set_size(1000)
    quick.relative_update(1000)
    assert not caplog.records


def test_a_key_that_vanishes_between_listing_and_reading_is_left_out(server, tmp_path, monkeypatch, caplog):
    """The pull lists the folder, then reads each file: one deleted in between (pruned by the run that owns the
    folder) is left out with a warning, the others arrive."""
    from checkpoint.remote import Mirror

    fs = _bucket(server, "runs")
    fs.pipe_file("runs/vanish/log.txt", b"{}\n")
    fs.pipe_file("runs/vanish/eval/gone.json", b"{}")
    mirror = Mirror("s3://runs/vanish", str(tmp_path / "staging"))
    mirror.fs = fs  # this process's fsspec read its endpoint setting at import: the test server's client instead
    listed = mirror.names()
    fs.rm_file("runs/vanish/eval/gone.json")
    monkeypatch.setattr(mirror, "names", lambda: listed)
    caplog.set_level("WARNING", logger="dino.remote")
    assert mirror.pull() == ["eval/gone.json", "log.txt"]
    assert (tmp_path / "staging" / "log.txt").read_bytes() == b"{}\n"
    assert not (tmp_path / "staging" / "eval" / "gone.json").exists()
    assert [r.getMessage() for r in caplog.records] == [
        "s3://runs/vanish/eval/gone.json was listed but is gone: left out"]
