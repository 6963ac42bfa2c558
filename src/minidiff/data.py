"""MNIST-family datasets from IDX files: find, verify, read, and draw batches.

A dataset lives in one folder holding the four IDX files (``.gz`` or raw). Folders are
searched in this order: ``--data-dir``, ``$MINIDIFF_DATA``, the user's ``<cache>/data/<name>/``
(where ``minidiff data fetch`` writes), the package's ``assets/data/<name>/`` (MNIST ships
there), then ``/usr/share/datasets/<name>/`` (where Debian's ``dataset-fashion-mnist`` puts its
files).

Every file's decompressed bytes are checked against a SHA-256 the first time it is used; the
verdict is remembered in a stamp keyed by path, size and mtime, so later loads skip the hash.
Images stay one uint8 tensor in memory and are scaled to ``[-1, 1]`` per batch.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .files import ASSETS, atomic_write_bytes, atomic_write_text, cache_dir

PACKAGED_DIR = ASSETS / "data"
SYSTEM_DIR = Path("/usr/share/datasets")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True)
class FileSpec:
    name: str  # without .gz
    sha256: str  # of the decompressed bytes
    count: int


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, tuple[FileSpec, FileSpec]]  # split -> (images, labels)
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    license: str
    # the metrics' memorisation threshold: the 5th percentile of the test images' pixel-L2
    # distances to their nearest training image (minidiff.metrics.memorization_threshold), a
    # property of these files alone, kept here because it costs 10,000 x 60,000 distances (10.9 s
    # on a 2-core AMD EPYC Zen 3, AVX2 only, bf16 emulated); None: computed on first use, cached
    memorization_threshold: float | None = None


def _split(prefix: str, img_sha: str, lbl_sha: str, count: int) -> tuple[FileSpec, FileSpec]:
    return (FileSpec(f"{prefix}-images-idx3-ubyte", img_sha, count),
            FileSpec(f"{prefix}-labels-idx1-ubyte", lbl_sha, count))


DATASETS: dict[str, DatasetSpec] = {
    # Digests of the original LeCun/Cortes/Burges files (assets/data/mnist/README.md).
    "mnist": DatasetSpec(
        "mnist",
        {
            "train": _split(
                "train", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60000),
            "test": _split(
                "t10k", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10000),
        },
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        tuple(str(d) for d in range(10)),
        "CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        memorization_threshold=1.6635715961456299,  # exact, from the files above
    ),
    # Digests of the decompressed files in Debian's dataset-fashion-mnist
    # 0.0~git20200523.55506a9-1 (Zalando's files; Debian recompressed the .gz wrappers).
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        {
            "train": _split(
                "train", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60000),
            "test": _split(
                "t10k", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10000),
        },
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"),
        "MIT (Zalando Research)",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- locating files


def user_dir(name: str) -> Path:
    """The user's folder for dataset ``name``: where ``minidiff data fetch`` writes by default
    (never into the installed package)."""
    return cache_dir() / "data" / name


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset ``name``, in order. ``data_dir`` may be the dataset folder
    itself or a parent holding ``<name>/``."""
    dirs: list[Path] = []
    for root in (data_dir, os.environ.get("MINIDIFF_DATA") or None):
        if root:
            dirs += [Path(root), Path(root) / name]
    dirs += [user_dir(name), PACKAGED_DIR / name, SYSTEM_DIR / name]
    return dirs


def _file_in(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_dataset(name: str, data_dir=None) -> Path:
    """The first folder that holds all of ``name``'s files, or a :class:`DataError`."""
    spec = get_spec(name)
    bases = [f.name for pair in spec.files.values() for f in pair]
    searched = candidate_dirs(name, data_dir)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder; pass a folder holding {name}'s "
                        "IDX files")
    for folder in searched:
        if all(_file_in(folder, b) for b in bases):
            return folder
    hint = ("install it with `apt-get install dataset-fashion-mnist`"
            if name == "fashion-mnist" else f"run `minidiff data fetch {name}`")
    raise DataError(
        f"dataset {name!r} not found (searched: {', '.join(str(d) for d in searched)}); "
        f"{hint} or pass --data-dir DIR"
    )


# --------------------------------------------------------------------------- reading + verifying


def read_bytes(path: Path) -> bytes:
    """The file's decompressed bytes (gzip detected by its magic, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check that it is a readable "
                        "file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{path}: corrupt or truncated gzip ({e}); "
                            "replace the file with a fresh copy") from None
    return raw


def parse_idx(data: bytes, expected_magic: int, source: str = "<bytes>") -> torch.Tensor:
    """Parse IDX bytes -> uint8 tensor ``[N x R x C]`` (images) or ``[N]`` (labels).

    Raises :class:`DataError` for a bad magic number, a truncated header or body, or trailing
    bytes, and nothing else.
    """
    dims, header, total = _idx_header(data, expected_magic, source)
    if len(data) != total:
        raise _size_error(source, dims, total, len(data))
    buf = bytearray(data[header:])  # writable copy: torch.frombuffer warns on read-only memory
    return torch.frombuffer(buf, dtype=torch.uint8).reshape(dims) if total > header else \
        torch.zeros(dims, dtype=torch.uint8)


def read_idx(path: Path, expected_magic: int) -> bytes:
    """An IDX file's decompressed bytes (gzip detected by its magic), read no further than its
    header declares: a header that claims more than the file holds (billions of images) is
    refused having read only what the file holds, and a raw file's header is checked against
    its length before its body is read. Errors as :func:`parse_idx`'s."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check that it is a readable "
                        "file") from None
    with raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw) if gz else raw
        try:
            head = f.read(4 + 4 * _idx_ndim(expected_magic))
            dims, _, total = _idx_header(head, expected_magic, str(path))
            if not gz and os.fstat(raw.fileno()).st_size != total:
                raise _size_error(str(path), dims, total, os.fstat(raw.fileno()).st_size)
            body = bytearray(head)  # grows with what is read, never to what the header claims
            while len(body) < total and (chunk := f.read(min(1 << 20, total - len(body)))):
                body += chunk
            extra = 0  # trailing bytes are counted, not kept
            while chunk := f.read(1 << 20):
                extra += len(chunk)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            if not gz:
                raise DataError(f"{path}: cannot read ({e}); check that it is a readable "
                                "file") from None
            raise DataError(f"{path}: corrupt or truncated gzip ({e}); "
                            "replace the file with a fresh copy") from None
    if len(body) + extra != total:
        raise _size_error(str(path), dims, total, len(body) + extra)
    return bytes(body)


def _idx_ndim(magic: int) -> int:
    return 3 if magic == IMAGES_MAGIC else 1


def _idx_header(data: bytes, expected_magic: int, source: str) -> tuple[tuple, int, int]:
    """The dimensions an IDX header (the start of ``data``) declares, the header's length and
    the whole file's -> ``(dims, header, total)``; :class:`DataError` for a bad magic number or
    a truncated header."""
    kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
    ndim = _idx_ndim(expected_magic)
    if len(data) < 4:
        raise DataError(f"{source}: truncated header ({len(data)} bytes); "
                        "replace the file with a fresh copy")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DataError(f"{source}: wrong magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(IDX {kind}); is this the right file?")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated header ({len(data)} of {header} bytes); "
                        "replace the file with a fresh copy")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    return dims, header, header + math.prod(dims)


def _size_error(source: str, dims: tuple, total: int, actual: int) -> DataError:
    what = "truncated" if actual < total else "has trailing bytes"
    return DataError(f"{source}: {what}: header says {dims} = {total} bytes, file has {actual}; "
                     "replace the file with a fresh copy")


def _stamp_path() -> Path:
    return cache_dir() / "verified.json"


def _stamp_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_stamps() -> dict:
    try:
        return json.loads(_stamp_path().read_text())
    except (OSError, ValueError):
        return {}


def is_verified(path: Path, sha256: str) -> bool:
    return _load_stamps().get(_stamp_key(path)) == sha256


def verify_bytes(path: Path, data: bytes, sha256: str) -> None:
    """Check ``data``'s SHA-256 unless a stamp says this exact file already passed."""
    if is_verified(path, sha256):
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise DataError(f"{path}: checksum mismatch: expected sha256 {sha256[:16]}..., got "
                        f"{actual[:16]}...; the file is corrupt or not the original, replace "
                        "it with a fresh copy")
    stamps = _load_stamps()
    stamps[_stamp_key(path)] = sha256
    try:
        atomic_write_text(_stamp_path(), json.dumps(stamps, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def load_split(name: str = "mnist", split: str = "train", data_dir=None):
    """``(images uint8 [N x 28 x 28], labels int64 [N])`` of a verified split (fresh tensors:
    a split read, parsed and verified once is kept in memory while its files stay unchanged)."""
    spec = get_spec(name)
    if split not in spec.files:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(spec.files)}")
    folder = find_dataset(name, data_dir)
    paths = tuple(_file_in(folder, f.name) for f in spec.files[split])
    stats = tuple((str(p), st.st_mtime_ns, st.st_size) for p in paths for st in [p.stat()])
    images, labels = _read_split(name, split, stats)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=4)
def _read_split(name: str, split: str, stats: tuple):
    """The parsed, verified split whose files are ``stats`` (path, mtime, size): a changed
    file is another key, so it is read and verified again."""
    spec = get_spec(name)
    out = []
    for fspec, magic, st in zip(spec.files[split], (IMAGES_MAGIC, LABELS_MAGIC), stats,
                                strict=True):
        path = Path(st[0])
        data = read_idx(path, magic)
        parsed = parse_idx(data, magic, str(path))  # header errors are the most specific
        verify_bytes(path, data, fspec.sha256)
        out.append(parsed)
    images, labels = out
    if len(images) != len(labels):
        raise DataError(f"{path.parent}: {len(images)} images but {len(labels)} labels; "
                        "replace the files with a consistent set")
    return images, labels.long()


def dataset_status(name: str, data_dir=None) -> dict:
    """Where ``name`` was found and whether each file verifies (hashes what is not stamped)."""
    try:
        folder = find_dataset(name, data_dir)
    except DataError as e:
        return {"name": name, "found": None, "verified": False, "error": str(e)}
    spec = get_spec(name)
    errors = []
    for pair in spec.files.values():
        for fspec, magic in zip(pair, (IMAGES_MAGIC, LABELS_MAGIC), strict=True):
            path = _file_in(folder, fspec.name)
            try:
                verify_bytes(path, read_idx(path, magic), fspec.sha256)
            except DataError as e:
                errors.append(str(e))
    return {"name": name, "found": str(folder), "verified": not errors,
            "error": "; ".join(errors) or None}


def status_table(rows: list[dict]) -> str:
    """:func:`dataset_status` rows as the lines `minidiff data list` prints."""
    lines = []
    for r in rows:
        state = "verified" if r["verified"] else ("NOT FOUND" if r["found"] is None else "FAILED")
        lines.append(f"{r['name']:<14} {state:<9} {r['found'] or ''}")
        if r["error"]:
            lines.append(f"{'':<14} {r['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- batches


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N x H x W]`` -> float32 ``[N x 1 x H x W]`` in ``[-1, 1]``."""
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# --------------------------------------------------------------------------- fetching


def fetch(name: str, dest: str | os.PathLike | None = None, timeout: float = 20.0) -> Path:
    """Download ``name``'s files from its mirrors into ``dest`` (default :func:`user_dir`) and
    verify them."""
    import urllib.error
    import urllib.request

    spec = get_spec(name)
    dest = Path(dest) if dest else user_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    for fspec, magic in ((f, m) for pair in spec.files.values()
                         for f, m in zip(pair, (IMAGES_MAGIC, LABELS_MAGIC), strict=True)):
        target = dest / f"{fspec.name}.gz"
        if target.is_file():
            try:
                verify_bytes(target, read_idx(target, magic), fspec.sha256)
                continue
            except DataError:
                pass
        last = None
        for mirror in spec.mirrors:
            url = f"{mirror}{fspec.name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    payload = r.read()
            except (urllib.error.URLError, OSError) as e:
                last = f"{url}: {getattr(e, 'reason', e)}"
                continue
            actual = hashlib.sha256(gzip.decompress(payload)).hexdigest()
            if actual != fspec.sha256:
                raise DataError(f"{url}: checksum mismatch (expected sha256 "
                                f"{fspec.sha256[:16]}..., got {actual[:16]}...); try again later")
            atomic_write_bytes(target, payload)
            break
        else:
            raise DataError(f"cannot download {name} ({last}); this machine may have no "
                            f"internet: copy the IDX files into {dest} or pass --data-dir DIR")
    return dest
