"""The IDX reader (benchmarks/fashion_mnist.py) on small IDX files written here; never needs the package."""

import gzip
import struct

import numpy as np
import pytest

from benchmarks.fashion_mnist import FILES, find_folder, load_splits, read_idx


def idx_bytes(array: np.ndarray, code: int, dtype: str) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_dataset(folder, n_train=12, n_test=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, arr in zip(FILES[split], (images, labels)):
            (folder / name).write_bytes(gzip.compress(idx_bytes(arr, 0x08, ">u1")))
    return folder


def test_reads_gzipped_and_plain_idx(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08, ">u1")))
    (tmp_path / "b").write_bytes(idx_bytes(images, 0x08, ">u1"))
    for name in ("a.gz", "b"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        assert np.array_equal(out, images)


def test_reads_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "c").write_bytes(idx_bytes(values, 0x0C, ">i4"))
    assert read_idx(tmp_path / "c").tolist() == [1, -2, 70000]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "needs 13"),
    ],
)
def test_bad_files_name_the_file(tmp_path, data, match):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(tmp_path / "bad")
    assert "bad" in str(info.value)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_folder(tmp_path)


def test_splits_hold_out_validation_disjointly(tmp_path):
    write_dataset(tmp_path)
    splits = load_splits(tmp_path, val=5, seed=1)
    assert [len(splits[k][0]) for k in ("train", "val", "test")] == [7, 5, 4]
    train_val = np.concatenate([splits["train"][0], splits["val"][0]])
    original = read_idx(tmp_path / FILES["train"][0])
    # every training image lands in exactly one of train / val
    assert sorted(map(bytes, train_val)) == sorted(map(bytes, original))
    assert splits["train"][1].dtype == np.int64 and splits["train"][0].dtype == np.uint8
    assert np.array_equal(load_splits(tmp_path, val=5, seed=1)["val"][0], splits["val"][0])  # seeded
