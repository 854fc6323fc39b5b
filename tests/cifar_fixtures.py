"""Tiny CIFAR-10 datasets in the real on-disk formats, for tests that must run the real loaders.

``write_cifar_tar``, ``write_cifar_folder`` and ``write_cifar_npz`` write the same images (for the same sizes and
seed) as the official ``cifar-10-python.tar.gz``, its extracted ``cifar-10-batches-py/`` folder, and an .npz of
uint8 arrays. ``make_cifar_arrays`` returns those images, to compare against.

The batches are pickled the way the official files were, by Python 2 and numpy 1.x: protocol 2, every string as a
Python 2 ``str`` (so ``encoding="bytes"`` turns it into bytes, e.g. the b'data' keys and the dtype's byte order),
and numpy's reconstructor named ``numpy.core.multiarray._reconstruct``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ddim_denoise.data.cifar10 import ARCHIVE_NAME, BATCH_FOLDER, IMAGE_SHAPE, NUM_CLASSES, TEST_BATCH, TRAIN_BATCHES


def make_cifar_arrays(n_train_per_batch: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 NHWC images and uint8 labels: ``len(TRAIN_BATCHES) * n_train_per_batch`` train, ``n_test`` test."""
    rng = np.random.default_rng(seed)
    n_train = len(TRAIN_BATCHES) * n_train_per_batch
    return {
        "x_train": rng.integers(0, 256, (n_train, *IMAGE_SHAPE), dtype=np.uint8),
        "y_train": rng.integers(0, NUM_CLASSES, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, *IMAGE_SHAPE), dtype=np.uint8),
        "y_test": rng.integers(0, NUM_CLASSES, n_test, dtype=np.uint8),
    }


class _Python2StylePickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: ``str`` and ``bytes`` both as Python 2 strings, numpy under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_python2_str
    dispatch[bytes] = _save_python2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray, batch_label: str) -> bytes:
    """One official-style batch: a dict with CIFAR's channel-major (N, 3072) uint8 rows and a list of int labels."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return python2_pickle({
        b"batch_label": batch_label,
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(rows),
        b"filenames": [f"image_{i}.png" for i in range(len(images))],
    })


def _batch_files(arrays: dict[str, np.ndarray], omit: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(file name, content) of every batch file in the official folder, less the ``omit`` ones."""
    omit = set(omit)
    x_parts = np.array_split(arrays["x_train"], len(TRAIN_BATCHES))
    y_parts = np.array_split(arrays["y_train"], len(TRAIN_BATCHES))
    for i, (name, x, y) in enumerate(zip(TRAIN_BATCHES, x_parts, y_parts), start=1):
        if name not in omit:
            yield name, cifar_batch_bytes(x, y, f"training batch {i} of {len(TRAIN_BATCHES)}")
    if TEST_BATCH not in omit:
        yield TEST_BATCH, cifar_batch_bytes(arrays["x_test"], arrays["y_test"], "testing batch 1 of 1")
    label_names = [f"class_{i}" for i in range(NUM_CLASSES)]
    yield "batches.meta", python2_pickle({b"label_names": label_names, b"num_vis": int(np.prod(IMAGE_SHAPE))})


def write_cifar_folder(raw_dir: str | Path, n_train_per_batch: int = 6, n_test: int = 4, seed: int = 0,
                       omit: Iterable[str] = ()) -> Path:
    """Write ``raw_dir/cifar-10-batches-py/`` (without the batch files named in ``omit``); return the folder."""
    folder = Path(raw_dir) / BATCH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in _batch_files(make_cifar_arrays(n_train_per_batch, n_test, seed), omit):
        (folder / name).write_bytes(content)
    return folder


def write_cifar_tar(raw_dir: str | Path, n_train_per_batch: int = 6, n_test: int = 4, seed: int = 0,
                    omit: Iterable[str] = ()) -> Path:
    """Write ``raw_dir/cifar-10-python.tar.gz`` with members under ``cifar-10-batches-py/``; return the archive."""
    path = Path(raw_dir) / ARCHIVE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(BATCH_FOLDER)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, content in _batch_files(make_cifar_arrays(n_train_per_batch, n_test, seed), omit):
            member = tarfile.TarInfo(f"{BATCH_FOLDER}/{name}")
            member.size, member.mode = len(content), 0o644
            tar.addfile(member, io.BytesIO(content))
    return path


def write_cifar_npz(raw_dir: str | Path, n_train_per_batch: int = 6, n_test: int = 4, seed: int = 0,
                    name: str = "cifar10.npz", **replace: np.ndarray) -> Path:
    """Write ``raw_dir/name`` holding x_train, y_train, x_test, y_test; ``replace`` swaps in arrays (bad ones too)."""
    path = Path(raw_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{**make_cifar_arrays(n_train_per_batch, n_test, seed), **replace})
    return path


class _RunsCode:
    """Unpickling this calls ``function(*args)``: the way a malicious pickle runs code."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def malicious_batch_bytes(function, *args) -> bytes:
    """A batch-shaped pickle whose b'data' entry calls ``function(*args)`` when unpickled."""
    return python2_pickle({b"data": _RunsCode(function, *args), b"labels": [0]})
