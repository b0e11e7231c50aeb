"""The chaos run on an object store (--output_dir s3://...): every start on a new machine, and a local view of
what the bucket holds for the checks to read."""
import argparse
import tempfile
from pathlib import Path

from checkpoint.remote import Mirror, staging_dir
from checkpoint.resume import decide_start
from checkpoint.store import CheckpointStore

CHECKED = ("log.txt",)  # beside the checkpoint files


class RemoteView:
    """A local copy of the remote output_dir's checkpoint files and log.txt, refreshed after every start. A
    file is downloaded again only when its object changed, so the checks count each write once."""

    def __init__(self, url: str, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.mirror, self.folder, self.tags = Mirror(url, str(folder)), folder, {}

    def sync(self) -> None:
        listing = self.mirror.listing()
        names = [n for n in listing if n in CHECKED or (n.startswith("checkpoint") and n.endswith(".pth"))]
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in names:
                path.unlink()
                self.tags.pop(path.name, None)
        for name in names:
            tag = _tag(listing[name])
            if self.tags.get(name) != tag:
                self.mirror.fetch(name, refresh=True)
                self.tags[name] = tag

    def upload(self, name: str) -> None:
        """Put the view's copy back (a bit the tool flipped)."""
        self.mirror.fs.put_file(str(self.folder / name), self.mirror.remote(name))
        self.tags[name] = _tag(self.mirror.listing()[name])


def _tag(info: dict):
    return info.get("ETag") or (info.get("size"), str(info.get("LastModified")))


def machine_staging(url: str, machine: Path) -> Path:
    """The staging folder main.py uses for url on a machine whose DINO_STAGING_DIR is `machine`."""
    return Path(staging_dir(url, str(machine)))


def expected_remote_start(parsed, url: str):
    """decide_start for a remote output_dir, on a fresh staging folder, as a new machine would decide."""
    folder = tempfile.mkdtemp(prefix="chaos-decide-")
    mirror = Mirror(url, folder)
    mirror.pull()
    args = argparse.Namespace(**{**vars(parsed), "output_dir": folder, "output_url": url})
    return decide_start(args, CheckpointStore(folder, mirror=mirror))
