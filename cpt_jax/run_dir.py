"""A run's `output_dir`: a local folder, or a `gs://` URL (a bucket every host of a TPU slice
reaches, without mounting it).

Orbax writes checkpoints to either directly; on GCS it marks a finished checkpoint with a
commit file instead of a rename, so a save cut short is still never restored. Everything else
(config.yaml, metrics.jsonl, TensorBoard events, results.json, plots, the tokenizer, RIF
counts) comes from writers of local files, and an object store cannot append to one. For a
URL they are written to a local staging folder instead, and `push` uploads what changed:
after each checkpoint and evaluation and at the end, so the bucket always holds the records a
resume from its newest checkpoint needs. `pull` fills a fresh staging folder from the bucket
first (a resume on another VM).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from etils import epath

URL_SCHEMES = ("gs://",)
CHECKPOINTS = "checkpoints"
_UNFINISHED = ".partial"  # a file still being written (results.json's atomic write)
_MARKER = ".cpt_jax_staging"  # names a staging folder's URL; only such a folder is emptied


class StagingError(ValueError):
    """A staging folder that holds files of something else."""


def is_url(path: os.PathLike | str) -> bool:
    return "://" in str(path)


def unsupported_url(path: str) -> str | None:
    """Why `path` cannot be an output_dir (a URL of another store), else None."""
    if is_url(path) and not path.startswith(URL_SCHEMES):
        return (f"output_dir: {path!r}: the only URLs supported are {', '.join(URL_SCHEMES)} "
                f"(or mount the store and name the mount)")
    return None


def as_path(path: os.PathLike | str) -> Path | epath.Path:
    """A local path (absolute), or an `epath.Path` for a URL (`pathlib` would collapse the
    `//` of `gs://bucket`)."""
    return epath.Path(str(path)) if is_url(path) else Path(path).resolve()


def default_staging(url: str) -> Path:
    """Where a URL's run stages its files unless `staging_dir` says: the system's temporary
    folder, one subfolder per URL."""
    return Path(tempfile.gettempdir()) / "cpt_jax_staging" / url.replace("://", "/", 1)


class RunDir:
    """`local`: where the run's writers write (the folder itself, or the staging folder of a
    URL); `checkpoints`: where Orbax writes (under the folder or the URL)."""

    def __init__(self, output_dir: str, staging_dir: str | None = None, *,
                 process_index: int = 0):
        """Processes after the first stage into subfolders of their own (several processes
        may share a host); only the first one's files are uploaded."""
        self.name = output_dir
        if error := unsupported_url(output_dir):
            raise ValueError(error)
        if is_url(output_dir):
            self.remote: epath.Path | None = epath.Path(output_dir)
            self.local = Path(staging_dir) if staging_dir else default_staging(output_dir)
            if process_index:
                self.local = self.local / f"process_{process_index}"
        else:
            self.remote = None
            self.local = Path(output_dir)
        self.checkpoints = as_path(output_dir) / CHECKPOINTS
        self._uploaded: dict[str, tuple[int, int]] = {}

    def __str__(self) -> str:
        return self.name

    def start(self, *, resume: bool) -> None:
        """A URL's staging folder for this run: the bucket's files when resuming (the staging
        folder may be gone or stale, on a new VM), else empty."""
        if self.remote is None:
            return
        marker = self.local / _MARKER
        if self.local.exists() and any(self.local.iterdir()):
            if not marker.exists():
                raise StagingError(f"staging_dir: {self.local} holds files that no gs:// run "
                                   f"staged: name an empty or new folder")
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.name + "\n")
        self._uploaded = {_MARKER: _signature(marker)}
        if resume:
            self.pull()

    def pull(self) -> None:
        """Downloads every file of the URL but its checkpoints into the staging folder."""
        if self.remote is None:
            return
        root = None  # fsspec walks the bucket's paths without their scheme
        for top, folders, files in self.remote.walk():
            top = PurePosixPath(str(top))
            if root is None:
                root = top
                if CHECKPOINTS in folders:
                    folders.remove(CHECKPOINTS)
            for name in files:
                relative = (top / name).relative_to(root).as_posix()
                target = self.local / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((self.remote / relative).read_bytes())
                self._uploaded[relative] = _signature(target)

    def push(self) -> None:
        """Uploads the staging folder's new and changed files to the URL."""
        if self.remote is None or not self.local.exists():
            return
        for path in sorted(self.local.rglob("*")):
            if not path.is_file() or path.name.endswith(_UNFINISHED):
                continue
            relative, signature = path.relative_to(self.local).as_posix(), _signature(path)
            if self._uploaded.get(relative) == signature:
                continue
            target = self.remote / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            self._uploaded[relative] = signature


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
