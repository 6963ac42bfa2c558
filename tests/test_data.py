import gzip
import re
import struct
import urllib.error

import pytest
import torch

from minidiff import data
from minidiff.data import IMAGES_MAGIC, LABELS_MAGIC, DataError, parse_idx


def idx_images(n=3, r=4, c=5, magic=IMAGES_MAGIC):
    body = bytes(range(n * r * c))
    return struct.pack(">IIII", magic, n, r, c) + body


def test_parse_good_images_and_labels():
    x = parse_idx(idx_images(), IMAGES_MAGIC)
    assert x.shape == (3, 4, 5) and x.dtype == torch.uint8
    assert x.flatten().tolist() == list(range(60))
    y = parse_idx(struct.pack(">II", LABELS_MAGIC, 4) + bytes([1, 2, 3, 9]), LABELS_MAGIC)
    assert y.tolist() == [1, 2, 3, 9]


def test_parse_truncated_body_names_sizes():
    with pytest.raises(DataError, match="truncated: header says"):
        parse_idx(idx_images()[:-1], IMAGES_MAGIC, "f.idx")


def test_parse_truncated_header():
    with pytest.raises(DataError, match="truncated header"):
        parse_idx(idx_images()[:10], IMAGES_MAGIC)


def test_parse_trailing_bytes():
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(idx_images() + b"x", IMAGES_MAGIC)


def test_parse_wrong_magic_names_both():
    with pytest.raises(DataError, match="wrong magic 0x00000801, expected 0x00000803"):
        parse_idx(idx_images(magic=LABELS_MAGIC), IMAGES_MAGIC)


def test_real_mnist_test_split_loads_and_verifies():
    images, labels = data.load_split("mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
    # the verdict is remembered: the second load does not hash
    folder = data.find_dataset("mnist")
    path = folder / "t10k-images-idx3-ubyte.gz"
    assert data.is_verified(path, data.DATASETS["mnist"].files["test"][0].sha256)


def _copy_mnist(tmp_path, mutate=None):
    """A private copy of MNIST's four files; ``mutate(name, raw_bytes) -> bytes``."""
    src = data.find_dataset("mnist")
    dst = tmp_path / "mnist"
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".gz"):
            raw = gzip.decompress(f.read_bytes())
            if mutate:
                raw = mutate(f.name, raw)
            (dst / f.name[:-3]).write_bytes(raw)  # raw IDX, no .gz: both are accepted
    return dst


def test_checksum_mismatch_names_file_and_digests(tmp_path):
    def flip(name, raw):
        if name.startswith("t10k-images"):
            raw = bytearray(raw)
            raw[1000] ^= 0xFF
        return bytes(raw)

    folder = _copy_mnist(tmp_path, flip)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: checksum mismatch: expected "
                                        r"sha256 0fa7898d509279e4\.\.\., got"):
        data.load_split("mnist", "test", data_dir=folder)


def test_truncated_file_is_reported(tmp_path):
    folder = _copy_mnist(tmp_path, lambda n, raw: raw[:-100] if "t10k-labels" in n else raw)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: truncated: header says "
                                        r"\(10000,\) = 10008 bytes, file has 9908"):
        data.load_split("mnist", "test", data_dir=folder)


def test_corrupt_gzip_is_reported(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"hello world" * 100)[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        data.read_bytes(bad)


def test_search_order_data_dir_then_env(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    a = _copy_mnist(tmp_path / "a")
    b_root = tmp_path / "b"
    b_root.mkdir()
    b = _copy_mnist(b_root)
    monkeypatch.setenv("MINIDIFF_DATA", str(b_root))
    assert data.find_dataset("mnist") == b  # env var holds <name>/
    assert data.find_dataset("mnist", data_dir=a) == a  # --data-dir wins


def test_search_order_user_folder_then_package_then_system(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "cache"))
    packaged = data.PACKAGED_DIR / "mnist"
    assert data.find_dataset("mnist") == packaged  # MNIST ships inside the package
    user = data.user_dir("mnist")
    assert user == tmp_path / "cache" / "data" / "mnist"
    user.parent.mkdir(parents=True)
    assert _copy_mnist(user.parent) == user
    assert data.find_dataset("mnist") == user  # a fetched copy wins over the packaged one
    assert data.candidate_dirs("mnist")[-3:] == [user, packaged, data.SYSTEM_DIR / "mnist"]


def test_missing_dataset_names_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PACKAGED_DIR", tmp_path / "pkg")
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "sys")
    with pytest.raises(DataError, match="dataset 'mnist' not found .*minidiff data fetch mnist"):
        data.find_dataset("mnist")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of: mnist"):
        data.get_spec("cifar")


def test_fetch_offline_says_so(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataError, match="may have no internet"):
        data.fetch("mnist", tmp_path / "m")
    assert not any((tmp_path / "m").glob("*.gz"))
    # by default into the user's folder, never into the installed package
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=re.escape(f"into {tmp_path / 'cache/data/mnist'} ")):
        data.fetch("mnist")


def test_batches_are_scaled_and_order_is_a_seeded_permutation():
    x = data.to_model_range(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 1, 2) and x.flatten().tolist() == [-1.0, 1.0]
    p = data.epoch_order(100, seed=3, epoch=1)
    assert sorted(p.tolist()) == list(range(100))
    assert torch.equal(p, data.epoch_order(100, seed=3, epoch=1))
    assert not torch.equal(p, data.epoch_order(100, seed=3, epoch=2))


def test_fashion_mnist_loads_and_verifies_when_installed():
    try:
        folder = data.find_dataset("fashion-mnist")
    except DataError:
        pytest.skip("dataset-fashion-mnist is not installed (.ci/run installs it with apt)")
    images, labels = data.load_split("fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and labels.max().item() == 9
    assert data.dataset_status("fashion-mnist")["verified"], folder
