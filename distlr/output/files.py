"""What rank 0 writes: result files, written atomically (temp file + rename), into a fresh
output directory; an existing result is never overwritten unless the user asks for it."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RESULT_FILE = "result.json"
PLOT_FILE = "lr_finder.png"
SERIES_FILE = "series.json"
SERIES_PLOT_FILE = "series.png"
CONFIG_FILE = "config.yaml"
TUNED_DS_FILE = "ds_config.tuned.json"
OUTPUTS = (RESULT_FILE, PLOT_FILE, SERIES_FILE, SERIES_PLOT_FILE, CONFIG_FILE, TUNED_DS_FILE)


CLAIM_FILE = ".distlr-run.lock"
"""Held (``flock``) by the run writing into a directory, with its PID and host inside; removed
when the run ends. The lock, not the file, says a run is alive: a crashed run's lock is free."""


class Claim:
    """A run's hold on its output directory: an exclusive ``flock`` on ``CLAIM_FILE``, taken
    before anything is written and held until ``release()``. Two runs started at once into one
    directory cannot both hold it; the kernel drops the lock of a run that died."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def take(self) -> None:
        """Hold the directory, or raise ``FileExistsError`` naming the run that holds it."""
        import fcntl

        lock = self.directory / CLAIM_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise FileExistsError(
                    f"output_dir={str(self.directory)!r} is in use by a distlr run that is still going ({owner}); "
                    "wait for it to end or choose another --output-dir (--overwrite never writes over a live run)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file the previous holder unlinked while we waited for it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the directory up (unlink, then unlock: a waiting run retries on the new file)."""
        if self._fd is None:
            return
        Path(self.directory / CLAIM_FILE).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


OWNER_WAIT_S = 1.0
"""How long a refused run waits for the holder's line in the lock file. The holder writes it
just after it takes the lock; a run that looks in between (CI saw it once in 20 pairs on a busy
2-core machine) would name no PID."""


def _read_owner(fd: int) -> str:
    """The line the claim's holder wrote (``pid N on HOST, since HH:MM:SS``), or "another process"."""
    deadline = time.monotonic() + OWNER_WAIT_S
    while True:
        owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if owner or time.monotonic() > deadline:
            return owner or "another process"
        time.sleep(0.01)


def new_output_dir(requested: str | None, *, overwrite: bool, root: str | Path = "distlr-runs") -> tuple[Path, bool, Claim]:
    """Create, claim and return the directory results go to, whether it was created here, and
    the claim (release it when the run ends).

    With no ``requested`` path: a new timestamped folder under ``root``, made with an exclusive
    ``mkdir`` (two runs in the same second get two folders). A requested directory is claimed
    (see ``Claim``) before it is checked, so two runs started at once cannot both pass the
    check: the second is refused with the first one's PID. A directory that already holds a
    result is refused unless ``overwrite`` is set.

    Raises:
        FileExistsError: another run holds the directory, or it holds earlier results and
            ``overwrite`` is False.
        PermissionError / NotADirectoryError: the directory cannot be written.
    """
    if requested is None:
        base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        _make(path.parent, exist_ok=True)
        while True:
            try:
                path.mkdir()  # exclusive: exactly one run makes each name
                break
            except FileExistsError:
                path, n = Path(f"{base}-{n}"), n + 1
        created = True
    else:
        path = Path(requested)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"output_dir={str(path)!r} exists and is not a directory")
        created = not path.exists()
        _make(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"output_dir={str(path)!r} is not writable; choose a writable --output-dir")
    claim = Claim(path)
    claim.take()
    found = [name for name in OUTPUTS if (path / name).exists()]
    if found and not overwrite:
        claim.release()
        raise FileExistsError(
            f"output_dir={str(path)!r} already holds {', '.join(found)}; choose another --output-dir "
            "or pass --overwrite"
        )
    return path, created, claim


def _make(path: Path, *, exist_ok: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as err:
        raise OSError(f"output_dir={str(path)!r} cannot be created ({err.strerror or err}); choose a writable "
                      "--output-dir") from None


def free_name(path: Path, also: tuple[str, ...] = ()) -> Path:
    """``path``, or ``stem-N.suffix`` with the first N that is free: nothing is overwritten.
    ``also``: other suffixes that name must be free with (a result and its figure share one)."""
    n = 1
    candidate = path
    while any(c.exists() for c in (candidate, *(candidate.with_suffix(s) for s in also))):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def remove_if_empty(path: Path) -> None:
    """Remove a directory this run made and left empty (a run that failed or was interrupted)."""
    try:
        path.rmdir()  # only succeeds when empty
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds,
    removed if it fails, so no half-written file is ever left at ``path``. The file gets the
    usual permissions (0666 less the umask), as ``open()`` would give it, not the temp file's 0600.

    Raises:
        FileNotFoundError: ``path``'s directory does not exist (naming ``path``).
    """
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: there is no directory {str(path.parent)!r}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
