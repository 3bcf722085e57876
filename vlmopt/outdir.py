"""OUT of ``vlmopt optimize``: one writer at a time, resumable state, and a crash-safe publish.

While a run is in progress OUT holds only its own files::

    .vlmopt.lock       fcntl lock held for the whole run (released by the kernel on death)
    .vlmopt-run.json   the run's settings (a re-run with the same ones resumes) and, once
                       the results are complete, the publish journal
    study.db           the optuna study (default storage)
    .publish/          the results being written

Publishing is a journalled move. Every result is first written into ``.publish/`` and synced;
then the run file records the list of names (the commit point); then each one is renamed into
OUT, ``plan.json`` last, and the journal goes. A directory cannot be renamed onto OUT as a whole
(OUT holds the study and the lock while the run goes on), so a crash at any moment leaves
either no result (``.publish/`` without a journal: removed by the re-run, which redoes only
the export and report; the study has the search) or a complete staged set that the re-run moves
in without loading anything. ``plan.json`` marks a finished OUT, which nothing overwrites.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from vlmopt.errors import VlmoptError

LOCK = ".vlmopt.lock"
RUN = ".vlmopt-run.json"
STAGE = ".publish"
STUDY = "study.db"
OURS = {LOCK, RUN, STAGE, STUDY}  # what a resumable OUT may hold
FINISHED = "plan.json"


def _read_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VlmoptError(f"{path}: not a vlmopt run file (broken JSON); remove it or use "
                          "another --out") from None
    if not isinstance(data, dict):
        raise VlmoptError(f"{path}: not a vlmopt run file; remove it or use another --out")
    return data


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OutDir:
    """The lock and the state of one optimize OUT. Use as a context manager around the run."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.run_file = self.out / RUN
        self.stage = self.out / STAGE
        self._fd: int | None = None
        self.created = False

    # ------------------------------------------------------------------ checks and the lock

    def precheck(self) -> None:
        """Refuse, creating nothing, an OUT that is not ours to write."""
        out = self.out
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise VlmoptError(f"--out {out}: exists and is not a directory")
            names = {p.name for p in out.iterdir()}
            if FINISHED in names and not self.run_file.exists():
                raise VlmoptError(f"--out {out}: holds a finished optimization "
                                  "(nothing overwritten)")
            if names and not (RUN in names or names <= {LOCK, STAGE}):
                raise VlmoptError(f"--out {out}: exists and is not empty (nothing overwritten)")
        elif not out.parent.is_dir():
            raise VlmoptError(f"--out {out}: parent directory {out.parent} does not exist")
        elif not os.access(out.parent, os.W_OK | os.X_OK):
            raise VlmoptError(f"--out {out}: parent directory {out.parent} is not writable")

    def acquire(self) -> None:
        """Create OUT if needed and take its lock; a second process is refused at once."""
        self.precheck()
        try:
            self.out.mkdir()
            self.created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise VlmoptError(f"--out {self.out}: cannot create ({e.strerror})") from None
        lock = self.out / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._undo_create()
                raise VlmoptError(f"--out {self.out}: cannot write ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise VlmoptError(f"--out {self.out}: another vlmopt process (pid {holder}) is "
                                  f"writing it (lock {lock}); wait for it to finish or use "
                                  "another --out") from None
            try:  # the holder before us may have removed the file: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; remove OUT if this run created it and left nothing worth keeping."""
        if self._fd is None:
            return
        keep = any(p.name != LOCK for p in self.out.iterdir()) if self.out.is_dir() else False
        (self.out / LOCK).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if not keep:
            self._undo_create()

    def _undo_create(self) -> None:
        if self.created:
            with contextlib.suppress(OSError):  # not empty: something of ours stays
                self.out.rmdir()
            self.created = False

    def __enter__(self) -> OutDir:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ resume state

    def state(self, signature: dict) -> str:
        """Under the lock: "fresh", "resume" (same settings) or "publish" (a complete staged
        result waits to be moved in). Another run's state is refused."""
        if not self.run_file.exists():
            if (self.out / FINISHED).exists():
                raise VlmoptError(f"--out {self.out}: holds a finished optimization "
                                  "(nothing overwritten)")
            if self.stage.exists():
                shutil.rmtree(self.stage)
            return "fresh"
        old = _read_run(self.run_file)
        diff = [k for k in signature if old.get("settings", old).get(k) != signature[k]]
        if diff:
            raise VlmoptError(f"--out {self.out}: holds an unfinished run with other settings "
                              f"({', '.join(diff)}); use another --out")
        if old.get("publishing") is not None:
            return "publish"
        if self.stage.exists():  # a run killed while writing its results: write them again
            shutil.rmtree(self.stage)
        return "resume"

    def start(self, signature: dict) -> None:
        self._write_run({"settings": signature})

    def _write_run(self, data: dict) -> None:
        tmp = self.run_file.with_name(RUN + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.run_file)

    # ------------------------------------------------------------------ publish

    def staging(self) -> Path:
        """An empty ``.publish/`` to write the results into."""
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()
        return self.stage

    def commit(self) -> None:
        """The staged results are complete: journal them, then move them into OUT."""
        _fsync_tree(self.stage)
        names = sorted((p.name for p in self.stage.iterdir()), key=lambda n: (n == FINISHED, n))
        if FINISHED not in names:
            raise VlmoptError(f"{self.stage}: no {FINISHED} staged")
        run = _read_run(self.run_file)
        run["publishing"] = names
        self._write_run(run)
        self.finish_publish()

    def finish_publish(self) -> None:
        """Move every staged name into OUT (plan.json last); idempotent, so a re-run after a
        crash at any point of it completes the same set."""
        names = _read_run(self.run_file)["publishing"]
        for name in names:
            src, dst = self.stage / name, self.out / name
            if not (src.exists() or src.is_symlink()):
                if not dst.exists():
                    raise VlmoptError(f"--out {self.out}: the interrupted publish lost {name}; "
                                      f"remove {self.run_file} and run again")
                continue  # moved before the crash
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)  # ours: only run files may be in OUT besides the results
            try:
                os.replace(src, dst)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
                    raise VlmoptError(f"--out {self.out}: cannot publish {name} "
                                      f"({e.strerror})") from None
                raise
        shutil.rmtree(self.stage, ignore_errors=True)
        self.run_file.unlink(missing_ok=True)
