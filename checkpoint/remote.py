"""An output_dir, --resume or --pretrain_model_path on an object store: s3://, gs://, az:// or any fsspec URL.

A run whose output_dir is a URL works in a local staging folder exactly as in a local output_dir; a Mirror
pushes every save there in the background (the files in the order the save wrote them, checkpoint.pth last)
and pulls the run's files first when a run starts, on this machine or a new one. An object appears whole on a
single PUT or a completed multipart upload, so a reader never sees half a checkpoint: checkpoint.pth, pushed
last, is the commit point there as on a local disk, and its integrity record is checked after every pull."""
import atexit
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from typing import List, Optional

import fsspec
import fsspec.callbacks

from util import run_dir

logger = logging.getLogger("dino.remote")

PROGRESS_SECONDS = 10  # between the lines of a long upload
RETRIES = 4  # attempts of a transfer before its failure is reported; waits of 1, 2, 4 s between them
LEASE = ".lease.json"
SMALL_FILES = ("info.txt", "log.txt", "events.jsonl", "run_id.txt", "config_cfg.py", "config_args_all.json",
               "dataset_checks.json")
_active = {"mirror": None}


class RemoteError(RuntimeError):
    """The object store could not be used; the message says what is safe where."""


def is_url(path) -> bool:
    """A path with a scheme (s3://bucket/x) other than file://."""
    text = str(path or "")
    return "://" in text and not text.startswith("file://")


def redact(text: str) -> str:
    """A command line or path without secrets: user:password@ in URLs and the query of http(s) URLs (signed
    URLs carry their signature there)."""
    text = re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)
    return re.sub(r"(https?://[^\s?]+)\?\S*", r"\1?***", text)


def filesystem(url: str, what: str = "--output_dir"):
    """(fsspec filesystem, path inside it) for url. A scheme no installed fsspec backend handles is refused
    with one line that says which package to install."""
    scheme = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(f"{what} {redact(url)}: {scheme}:// is not a storage fsspec knows; use a local path or an "
                         "object store URL such as s3://bucket/path, gs://bucket/path or az://container/path") from None
    except ImportError as e:
        raise ValueError(f"{what} {redact(url)}: {scheme}:// needs a package that is not installed ({e}); install "
                         "it (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
    return fsspec.core.url_to_fs(url)


def staging_root() -> str:
    return os.environ.get("DINO_STAGING_DIR") or os.path.join(tempfile.gettempdir(), "dino-staging")


def staging_dir(url: str, root: Optional[str] = None) -> str:
    """The local folder a run with this remote output_dir works in (one per URL on each machine)."""
    return os.path.join(root or staging_root(), hashlib.sha256(url.encode()).hexdigest()[:16])


def local_copy(url: str) -> str:
    """A local copy of a remote file (--resume s3://...), downloaded once per process."""
    cached = _downloads.get(url)
    if cached is None:
        fs, path = filesystem(url, "the checkpoint")
        cached = os.path.join(staging_root(), "downloads", hashlib.sha256(url.encode()).hexdigest()[:16],
                              os.path.basename(path))
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        _transfer(lambda: fs.get_file(path, cached + ".part"), f"download {redact(url)}")
        os.replace(cached + ".part", cached)
        _downloads[url] = cached
    return cached


_downloads = {}


def _transfer(action, what: str, attempts: int = RETRIES):
    """Run a transfer, retrying with back-off; a missing object is not retried."""
    for attempt in range(attempts):
        try:
            return action()
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise RemoteError(f"could not {what}: permission denied ({_reason(e)})") from None
        except Exception as e:  # connection errors, timeouts, 5xx answers: each backend has its own types
            if attempt == attempts - 1:
                raise RemoteError(f"could not {what} after {attempts} attempt(s): {_reason(e)}") from None
            logger.warning("could not %s (%s); retrying in %d s", what, _reason(e), 2 ** attempt)
            time.sleep(2 ** attempt)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class UploadProgress(fsspec.callbacks.Callback):
    """A line every PROGRESS_SECONDS while an upload lasts (a multi-GB checkpoint on a slow link), so that a long
    upload is visible; a short one says nothing."""

    def __init__(self, display: str, clock=time.monotonic):
        super().__init__()
        self.display, self.clock = display, clock
        self.started = self.last = clock()

    def call(self, *args, **kwargs) -> None:
        now = self.clock()
        if now - self.last < PROGRESS_SECONDS or not self.size:
            return
        self.last = now
        rate = self.value / max(now - self.started, 1e-9)
        left = (self.size - self.value) / max(rate, 1)
        logger.info("uploading %s: %.0f%% of %.0f MB, %.1f MB/s, about %.0f s left", self.display,
                    100 * self.value / self.size, self.size / 2**20, rate / 2**20, left)


class Mirror:
    """The remote copy of a run's output_dir (url) and its local staging folder (local)."""

    def __init__(self, url: str, local: str):
        self.url, self.local = url.rstrip("/"), local
        self.fs, self.root = filesystem(self.url)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._heartbeat = None
        self.pushed_seconds = 0.0
        self.sent = {}  # small files: the (size, mtime) last uploaded, so an unchanged one is not sent again
        self.aborted: List[str] = []  # uploads a kill left incomplete, aborted at start-up

    def remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def display(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def check(self) -> None:
        """Fail at start-up, in one line, when the store cannot be reached, the bucket does not exist or the
        credentials do not allow listing it."""
        bucket = self.root.split("/", 1)[0]
        try:
            _transfer(lambda: self.fs.ls(bucket, refresh=True), f"list {self.url}")
        except FileNotFoundError:
            raise RemoteError(f"--output_dir {self.url}: the bucket {bucket} does not exist (or these credentials "
                              "cannot see it): create it or choose another --output_dir") from None
        except RemoteError as e:
            fix = "check the credentials this machine uses for the store" if "permission denied" in str(e) else \
                "check the network and the store's address (an endpoint setting), then rerun"
            raise RemoteError(f"--output_dir {self.url}: {e}: {fix}; nothing was trained or written") from None

    def abort_incomplete_uploads(self) -> List[str]:
        """Multipart uploads under this folder that a kill left incomplete: never visible, but stored (and
        billed) until aborted. S3 only; other stores have no such uploads to list."""
        if not hasattr(self.fs, "list_multipart_uploads"):
            return []
        bucket, _, prefix = self.root.partition("/")
        aborted = []
        for upload in self.fs.list_multipart_uploads(bucket):
            if upload["Key"].startswith(prefix + "/"):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"][len(prefix) + 1:])
        self.aborted = aborted
        return aborted

    def names(self) -> List[str]:
        """The run files in the remote output_dir (relative names; eval/ files too)."""
        return sorted(self.listing())

    def listing(self) -> dict:
        """{relative name: the store's information (size, ETag, ...)} of the run files in the remote output_dir."""
        try:
            found = self.fs.find(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        names = {path[len(self.root) + 1:]: info for path, info in found.items()}
        return {n: info for n, info in names.items() if not n.startswith("previous/") and n != LEASE}

    def pull(self, checkpoint: bool = True) -> List[str]:
        """Make the staging folder hold the remote run's files: the logs, the run's folders and (checkpoint)
        checkpoint.pth now, the others (numbered, best) when asked for (fetch). Local run files the remote does
        not have are removed: the remote is the truth. Returns the remote names."""
        names = self.names()
        os.makedirs(os.path.join(self.local, "eval"), exist_ok=True)
        for name in _local_run_files(self.local):
            if name not in names:
                os.remove(os.path.join(self.local, name))
        for name in names:
            if name in SMALL_FILES or (checkpoint and name == "checkpoint.pth") or "/" in name:  # logs, folders
                try:
                    self.fetch(name, refresh=True)
                except FileNotFoundError:  # removed since the listing (a pruned file): the remote has it no more
                    logger.warning("%s was listed but is gone: left out", self.display(name))
        return names

    def fetch(self, name: str, refresh: bool = False) -> str:
        """The local copy of a remote run file; a key that vanished between listing and reading is reported
        as missing (FileNotFoundError)."""
        local = os.path.join(self.local, name)
        if refresh or not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            _transfer(lambda: self.fs.get_file(self.remote(name), local + ".part"), f"download {self.display(name)}")
            os.replace(local + ".part", local)
        return local

    def push(self, names: List[str], attempts: int = RETRIES) -> None:
        """Upload these run files, in this order, then the small files; every file whole."""
        started = time.time()
        for name in list(names) + [n for n in _small_files(self.local) if n not in names]:
            path = os.path.join(self.local, name)
            if not os.path.exists(path):
                continue
            stat = os.stat(path)
            if name not in names and self.sent.get(name) == (stat.st_size, stat.st_mtime_ns):
                continue
            progress = UploadProgress(self.display(name))
            _transfer(lambda: self.fs.put_file(path, self.remote(name), callback=progress),
                      f"upload {self.display(name)}", attempts)
            self.sent[name] = (stat.st_size, stat.st_mtime_ns)
        self.pushed_seconds = time.time() - started

    def remove(self, names: List[str]) -> None:
        for name in names:
            try:
                _transfer(lambda: self.fs.rm_file(self.remote(name)), f"remove {self.display(name)}")
            except FileNotFoundError:
                pass

    def set_aside(self, folder: str) -> List[str]:
        """Move the remote run's files to previous/<folder>/, as run_dir.set_aside does locally."""
        moved = [n for n in self.names() if run_dir.is_run_file(n)]
        if not any(n.endswith(".pth") or n == "log.txt" for n in moved):  # no run was there
            return []
        for name in moved:
            target = self.remote(f"previous/{folder}/{name}")
            _transfer(lambda: self.fs.mv(self.remote(name), target), f"move {self.display(name)}")
        return moved

    # -----------------------------------------------------------------------------------------
    # The lease: one run at a time on a remote output_dir

    def acquire(self, seconds: float) -> None:
        """Hold the remote output_dir: a lease object that this run renews every seconds/3 and that expires
        `seconds` after its last renewal, so a killed run frees it within that time. A lease of another live
        run is refused; one of a process on this machine that no longer exists is taken over at once.
        Two runs that start within the same instant could both take it: object stores here offer no
        compare-and-swap."""
        held = self._read_lease()
        if held and held["token"] != self.token and held["expires"] > time.time() and not _dead_here(held):
            raise RemoteError(f"{self.url} is in use by another run (pid {held['pid']} on {held['host']}, its lease "
                              f"expires in {held['expires'] - time.time():.0f} s unless renewed); wait for it to end, "
                              "or choose another --output_dir")
        self._write_lease(seconds)
        self._heartbeat = threading.Thread(target=self._renew, args=(seconds,), daemon=True, name="lease")
        self._heartbeat.start()
        atexit.register(self.release)
        _active["mirror"] = self

    def _renew(self, seconds: float) -> None:
        while self._heartbeat is not None:
            time.sleep(seconds / 3)
            try:
                self._write_lease(seconds)
            except Exception as e:  # the next renewal tries again; the lease lasts `seconds`
                logger.warning("could not renew the lease on %s: %s", self.url, _reason(e))

    def release(self) -> None:
        if self._heartbeat is None:
            return
        self._heartbeat = None
        try:
            if (self._read_lease() or {}).get("token") == self.token:
                self.fs.rm_file(self.remote(LEASE))
        except Exception:  # an expired lease frees the folder anyway
            pass

    def _read_lease(self) -> Optional[dict]:
        try:
            return json.loads(self.fs.cat_file(self.remote(LEASE)))
        except (FileNotFoundError, ValueError):
            return None

    def _write_lease(self, seconds: float) -> None:
        lease = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                 "expires": time.time() + seconds}
        self.fs.pipe_file(self.remote(LEASE), json.dumps(lease).encode())


def active() -> Optional[Mirror]:
    """This process's mirror, if its output_dir is remote and it holds the lease."""
    return _active["mirror"]


def _dead_here(lease: dict) -> bool:
    return lease["host"] == socket.gethostname() and not os.path.exists(f"/proc/{lease['pid']}")


def _local_run_files(local: str) -> List[str]:
    names = []
    for folder, _, files in os.walk(local):
        relative = os.path.relpath(folder, local)
        if relative.split(os.sep)[0] == "previous":
            continue
        names += [f if relative == "." else f"{relative}/{f}" for f in files]
    return [n for n in names if run_dir.is_run_file(n) or n in SMALL_FILES]


def _small_files(local: str) -> List[str]:
    """The logs and the files of the run's folders (evaluations, TensorBoard, sample ids), sent after each save."""
    folders = []
    for folder in run_dir.RUN_FOLDERS:
        for parent, _, files in sorted(os.walk(os.path.join(local, folder))):
            folders += sorted(os.path.relpath(os.path.join(parent, f), local).replace(os.sep, "/") for f in files)
    return [n for n in SMALL_FILES if os.path.exists(os.path.join(local, n))] + folders
