"""Small file helpers: the package's assets, the cache folder, atomic writes and image grids."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MinidiffError

# Shipped with the package (wheel or checkout alike): classifiers, models, MNIST, the web page.
ASSETS = Path(__file__).resolve().parent / "assets"


def cache_dir() -> Path:
    """``$MINIDIFF_CACHE``, else ``$XDG_CACHE_HOME/minidiff``, else ``~/.cache/minidiff``."""
    root = os.environ.get("MINIDIFF_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "minidiff"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename, so a
    crash leaves either the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not e.filename:  # name the file the user was writing
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


LOCK_FILE = ".lock"
_HELD: set[str] = set()  # folders whose run_lock this process holds


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``folder/.lock`` (the folder is created) while the
    block runs, so two commands never write one run folder at once. The OS releases the lock
    when the process ends, crash or SIGKILL included, so a stale lock file blocks nobody; the
    file records the holder's pid for the error a second writer gets.

    Re-entrant within one process: the demo holds its folder's lock and trains into that same
    folder, whose training loop takes the lock again (flock would refuse a second descriptor
    of the same process)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        yield folder
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise MinidiffError(f"{folder} is in use by process {holder}; wait for it to "
                                "finish (or stop it) and run the command again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield folder
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def grid_png(images, nrow: int | None = None, pad: int = 2, scale: int = 2) -> bytes:
    """uint8 images ``[N x H x W]`` -> the bytes of one PNG grid (``nrow`` per row, default
    ~sqrt N), upscaled ``scale`` times (nearest)."""
    import io as _io
    import math

    import numpy as np
    from PIL import Image

    imgs = np.asarray(images, dtype=np.uint8)
    assert imgs.ndim == 3, f"expected [N x H x W] uint8 images, got shape {imgs.shape}"
    n, h, w = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 40, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = imgs[k]
    img = Image.fromarray(grid, mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
              scale: int = 2) -> None:
    """Save uint8 images ``[N x H x W]`` as one PNG grid (see :func:`grid_png`) to a .png."""
    if Path(path).suffix.lower() != ".png":
        raise MinidiffError(f"{path}: the grid must be a .png file")
    atomic_write_bytes(path, grid_png(images, nrow, pad, scale))
