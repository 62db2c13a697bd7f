"""What rank 0 writes: result files, written atomically (temp file + rename), into a fresh
output directory; an existing result is never overwritten unless the user asks for it."""

from __future__ import annotations

import contextlib
import os
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
OUTPUTS = (RESULT_FILE, PLOT_FILE, CONFIG_FILE, TUNED_DS_FILE)


def new_output_dir(requested: str | None, *, overwrite: bool, root: str | Path = "distlr-runs") -> tuple[Path, bool]:
    """Create and return the directory results go to, and whether it was created here.

    With no ``requested`` path: a new timestamped folder under ``root``. A requested directory
    that already holds a result is refused unless ``overwrite`` is set.

    Raises:
        FileExistsError: the directory holds earlier results and ``overwrite`` is False.
        PermissionError / NotADirectoryError: the directory cannot be written.
    """
    if requested is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) / stamp
        path, n = base, 1
        while path.exists():
            path, n = Path(f"{base}-{n}"), n + 1
    else:
        path = Path(requested)
        found = [name for name in OUTPUTS if (path / name).exists()]
        if found and not overwrite:
            raise FileExistsError(
                f"output_dir={str(path)!r} already holds {', '.join(found)}; choose another --output-dir "
                "or pass --overwrite"
            )
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"output_dir={str(path)!r} exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"output_dir={str(path)!r} cannot be created ({err.strerror or err}); choose a writable "
                      "--output-dir") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"output_dir={str(path)!r} is not writable; choose a writable --output-dir")
    return path, created


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
