"""Fashion-MNIST from its gzipped IDX files (Debian package ``dataset-fashion-mnist``), read with numpy.

No download code: the files come from ``apt-get install dataset-fashion-mnist`` (they land in
``/usr/share/datasets/fashion-mnist``) or from any folder holding the four files.

IDX format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then one
big-endian int32 per dimension, then the values, big-endian, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

DEFAULT_FOLDER = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist (or pass --data FOLDER with the four *-ubyte.gz files)"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# IDX type code -> big-endian numpy dtype
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = Tuple[np.ndarray, np.ndarray]  # images (N, 28, 28) uint8, labels (N,) int64


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in .gz) into an array of its own shape and type.

    Raises:
        ValueError: naming the file, when the header or the length is not that of an IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes but the header {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_folder(folder: Optional[Union[str, Path]] = None) -> Path:
    """The folder holding the four files: ``folder`` or the Debian package's.

    Raises:
        FileNotFoundError: with the install command, when a file is missing.
    """
    root = Path(folder) if folder is not None else DEFAULT_FOLDER
    missing = [name for pair in FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); install it: {INSTALL_HINT}"
        )
    return root


def read_split(root: Path, split: str) -> Split:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official "train" or "test" split."""
    images, labels = (read_idx(root / name) for name in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images.astype(np.uint8), labels.astype(np.int64)


def load_splits(folder: Optional[Union[str, Path]] = None, val: int = 5000, seed: int = 0) -> Dict[str, Split]:
    """train / val / test: ``val`` images held out of the official training split (seeded), test untouched."""
    root = find_folder(folder)
    images, labels = read_split(root, "train")
    if not 0 < val < len(images):
        raise ValueError(f"val must be in (0, {len(images)}), got {val}")
    order = np.random.default_rng(seed).permutation(len(images))
    held, kept = order[:val], order[val:]
    return {
        "train": (images[kept], labels[kept]),
        "val": (images[held], labels[held]),
        "test": read_split(root, "test"),
    }
