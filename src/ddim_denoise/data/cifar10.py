"""CIFAR-10 on disk: find the raw source, read it safely, validate it, and write the seeded train/val/test split.

This is the library side of the DVC ``prepare`` stage. Three raw formats are accepted in ``params.data.raw_dir``,
looked for in this order:

1. the official ``cifar-10-python.tar.gz`` (read member by member, never extracted);
2. its extracted ``cifar-10-batches-py/`` folder;
3. an ``.npz`` holding ``x_train, y_train, x_test, y_test`` (uint8 NHWC images, labels 0..9), e.g. the offline copy
   made by ``cifar10_from_jpeg.py``.

If none is present and ``params.data.download`` is true, the official archive is downloaded with torchvision.

The official batches are pickles, and unpickling runs whatever code the file names. They are therefore read with a
restricted unpickler that only rebuilds numpy arrays and plain containers, no larger in all than one official
batch; anything else is refused. Every problem with the data (missing, truncated, corrupt, wrong shape, bad labels)
is raised as one ``DataError`` line that names the file and the fix, never as a traceback from deep inside tarfile,
zipfile or pickle.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import pickle
import pickletools
import reprlib
import shutil
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from ddim_denoise.data.prepared import MANIFEST_FORMAT, one_line, reading, save_npy, split_paths
from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.files import MANIFEST_FILE

log = logging.getLogger(__name__)

# The CIFAR-10 format: facts about the dataset, not settings.
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_NAMES = (*TRAIN_BATCHES, TEST_BATCH)
IMAGE_SHAPE = (32, 32, 3)  # stored as HWC uint8
NUM_CLASSES = 10
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
PREFERRED_NPZ = "cifar10.npz"  # the name the offline copy's command writes (docs/pipeline.md, *Data*); chosen first
ORIGINALS_NPZ = "originals.npz"  # in raw_dir: original pixels of the first images (data.originals: auto finds it)
CIFAR_HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

SourceKind = Literal["tar", "folder", "npz"]
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A raw CIFAR-10 source found on disk."""

    kind: SourceKind
    path: Path

    def describe(self) -> str:
        what = {"tar": "official archive", "folder": "extracted official batches", "npz": "npz arrays"}[self.kind]
        return f"CIFAR-10 {what} at {self.path}"


@dataclass(frozen=True)
class Cifar10:
    """The official train and test sets as uint8 NHWC images and uint8 labels, validated."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------------------------------------------------------------
# Finding (and if allowed, downloading) a source


def _accepted_sources_hint(raw_dir: Path) -> str:
    return (f"put {ARCHIVE_NAME} (from {CIFAR_HOMEPAGE}), its extracted {BATCH_FOLDER}/ folder, "
            f"or an .npz with {', '.join(NPZ_KEYS)} (uint8, images N x 32 x 32 x 3) in {raw_dir}/")


def find_source(raw_dir: str | Path) -> Source | None:
    """The first usable-looking source in ``raw_dir`` in the documented order, or None if there is none."""
    raw_dir = Path(raw_dir)
    if (raw_dir / ARCHIVE_NAME).is_file():
        return Source("tar", raw_dir / ARCHIVE_NAME)
    if (raw_dir / BATCH_FOLDER).is_dir():
        return Source("folder", raw_dir / BATCH_FOLDER)
    npz_files = (sorted(p for p in raw_dir.glob("*.npz") if p.is_file() and p.name != ORIGINALS_NPZ)
                 if raw_dir.is_dir() else [])
    if (raw_dir / PREFERRED_NPZ) in npz_files:
        return Source("npz", raw_dir / PREFERRED_NPZ)
    if len(npz_files) > 1:
        names = ", ".join(p.name for p in npz_files)
        raise DataError(f"{raw_dir}/ holds several .npz files ({names}): keep one, or name the CIFAR-10 one "
                        f"{PREFERRED_NPZ}")
    return Source("npz", npz_files[0]) if npz_files else None


def _download_official(raw_dir: Path) -> None:
    """Download the official archive into ``raw_dir``, atomically.

    torchvision supplies the URL and MD5 and verifies the file. We call its downloader rather than
    ``torchvision.datasets.CIFAR10(download=True)`` because that constructor immediately unpickles the batches with
    plain ``pickle.load``, and all unpickling here goes through the restricted unpickler. The archive is downloaded
    into a temporary folder and renamed into place, so an interrupted download never leaves a truncated archive
    behind.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_url

    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=raw_dir))
    try:
        download_url(CIFAR10.url, root=str(tmp_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        (tmp_dir / CIFAR10.filename).replace(raw_dir / ARCHIVE_NAME)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_source(raw_dir: str | Path, download: bool) -> Source:
    """The source in ``raw_dir``; downloads the official archive first if there is none and ``download`` is true."""
    raw_dir = Path(raw_dir)
    source = find_source(raw_dir)
    if source is not None:
        return source
    if not download:
        raise DataError(f"no CIFAR-10 data found: {_accepted_sources_hint(raw_dir)} "
                        "(automatic download is off: data.download is false)")
    log.info("no CIFAR-10 data in %s/; downloading the official archive", raw_dir)
    try:
        _download_official(raw_dir)
    except Exception as e:  # no network, DNS, HTTP error, MD5 mismatch, disk full: all reported the same way
        raise DataError(f"no CIFAR-10 data found and the download failed ({one_line(e)}): "
                        f"{_accepted_sources_hint(raw_dir)}") from e
    source = find_source(raw_dir)
    if source is None:  # the downloader reported success but left nothing usable
        raise DataError(f"the download finished but {raw_dir / ARCHIVE_NAME} is missing: "
                        f"{_accepted_sources_hint(raw_dir)}")
    return source


def pull_tracked_raw_data(dvc_file: str | Path = "data.dvc") -> bool:
    """Try ``dvc pull`` of the raw data that ``dvc_file`` records (from the cache or the default remote)."""
    if not Path(dvc_file).is_file() or shutil.which("dvc") is None:
        return False
    done = subprocess.run(["dvc", "pull", "-q", str(dvc_file)], capture_output=True, text=True)
    if done.returncode != 0:
        log.info("dvc pull %s: not available (%s)", dvc_file, (done.stderr.strip().splitlines() or ["no output"])[-1])
    return done.returncode == 0


def fetch_data(raw_dir: str | Path, download: bool, dvc_file: str | Path | None = None) -> str:
    """Make sure ``raw_dir`` holds a source and describe it in one line: what is there already, else the version
    ``dvc_file`` tracks (``dvc pull``), else the official download if allowed, else one clear error.

    Run before ``dvc repro`` so that a user without data sees how to get it, not DVC's "missing dependency".
    """
    if find_source(raw_dir) is None and dvc_file is not None:
        pull_tracked_raw_data(dvc_file)
    return ensure_source(raw_dir, download).describe()


# ---------------------------------------------------------------------------------------------------------------------
# Reading the official pickled batches safely


# One official batch: 10000 images of 3072 uint8 values (30,720,000 bytes) plus 10000 labels and file names, ~31 MB
# on disk. A batch file, and everything its unpickling builds, may take this much and no more: a 48-byte pickle can
# ask for a 200 MB bytes object, and nothing CIFAR-10 holds needs more. The margin admits a batch re-pickled by
# Python 3.
MAX_BATCH_BYTES = 40_000_000
# An official batch is ~30,000 pickle opcodes (a dict of 10000 labels and 10000 file names). Each opcode may leave an
# object on the unpickler's stack or memo, so their number bounds the memory they take.
MAX_BATCH_OPCODES = 200_000
# What a container constructor may take per item it makes: a pointer and a new small object (a numpy scalar or row
# view, a one-character string). Also what each opcode is charged for what it makes besides its argument: a stack or
# memo slot, a small object (an int, a float, an empty container, a short tuple) and its place in a list or dict.
_ITEM_BYTES = 128
# What an opcode that calls a constructor (REDUCE and the like) is charged for the object it gets back, on top of
# what the constructor charges for its content: an empty array with its attribute dict takes ~500 bytes.
_CALL_BYTES = 1024
_CALL_OPCODES = frozenset({"REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"})
# A batch's str values are short: the file names and labels, and the module and function names of GLOBAL. Decoded, a
# character may take 4 bytes (one astral character makes the whole str 4 bytes a character), so a str argument is
# limited to this many bytes and charged 4 bytes a byte. The official batches hold their file names as Python 2
# strings, which become bytes, not str.
MAX_TEXT_BYTES = 4096
_TEXT_OPCODES = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "GLOBAL", "INST"})
_LONG_OPCODES = frozenset({"LONG1", "LONG4"})  # an int of n bytes takes up to ~1.1 n bytes: charged 2 a byte
_LENGTH_PREFIXES = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                    pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}
# numpy's __setstate__ keeps a bytes object longer than this as the array's buffer (when aligned, always so for
# one-byte items) instead of copying it.
_NUMPY_COPIES_UP_TO = 1000


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR-10 batch never does; the message says what, as ``it ...``."""


class _ForbiddenGlobal(_Refused):
    """The pickle names a global outside the allowlist: it would run code, so it is not a CIFAR-10 batch."""

    def __init__(self, name: str):
        super().__init__(f"it asks for {name}")


class _Budget:
    """The bytes an unpickling may still build; every allowed constructor charges what it is asked to make first."""

    def __init__(self, limit: int = MAX_BATCH_BYTES):
        self.left = limit

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise _Refused(f"it builds {what} of {nbytes} bytes, more than the {self.left} left of the "
                           f"{MAX_BATCH_BYTES} one batch may build")
        self.left -= nbytes


class _Global:
    """An allowed global as the unpickler hands it out: a callable whose state no pickle can set. A BUILD opcode on a
    plain function would set its attributes (``__defaults__``...), for the whole process where it is module-level."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)

    def __setstate__(self, state):
        raise _Refused(f"it sets the state of {self.name}")


def _builtin_dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` for a pickle: plain numbers only, and always numpy's shared instance (never a copy, as a pickle
    asks for), whose ``__setstate__`` numpy ignores; a copy would take the pickle's state, which can mark uint8 as
    holding object pointers."""
    if isinstance(spec, bytes):  # Python 2 pickles (the official batches) name it in a byte string
        spec = spec.decode("ascii", errors="replace")
    try:
        dtype = np.dtype(spec) if isinstance(spec, str) else spec if isinstance(spec, np.dtype) else None
    except TypeError:  # not a type numpy knows
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or not dtype.isnative:
        raise _ForbiddenGlobal(f"numpy.dtype({reprlib.repr(spec)})")
    return np.dtype(dtype.str)  # numpy's shared instance of a native number type


def _array_bytes(shape: object, dtype: np.dtype) -> int:
    """The bytes an array of ``shape`` and ``dtype`` holds (or would, copied), refusing shapes numpy would misread."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise _Refused(f"it builds an array of shape {reprlib.repr(shape)}")
    return math.prod(dims) * dtype.itemsize


class _BoundedArray(np.ndarray):
    """What the unpickler builds arrays as: pickles fill arrays through ``__setstate__`` (shape, dtype, bytes), and
    numpy copies what it is given there (a str's latin-1 encoding, small bytes), so each copy is charged first. A
    large bytes object numpy keeps as the array's buffer, without a copy: the opcode that made it was charged."""

    _budget: _Budget

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise _Refused(f"it sets an array's state to a {type(state).__name__}")
        shape, dtype, raw = state[-4], _builtin_dtype(state[-3]), state[-1]
        nbytes, what = _array_bytes(shape, dtype), f"an array of shape {reprlib.repr(shape)} and {dtype}"
        kept = type(raw) is bytes and len(raw) == nbytes > _NUMPY_COPIES_UP_TO and dtype.itemsize == 1
        if not kept:
            self._budget.charge(nbytes, what)
        super().__setstate__(state)
        if kept and self.base is not raw:  # a numpy that copies after all: charged now, over the budget by one array
            self._budget.charge(nbytes, what)


def _numpy_array_constructors(budget: _Budget) -> dict[tuple[str, str], _Global]:
    """The globals a pickled ndarray refers to, under the module names old and new numpy write, each charging the
    array it makes to ``budget``.

    The official batches were pickled by Python 2 with numpy 1.x (``numpy.core.multiarray``); numpy 2 names the same
    function ``numpy._core.multiarray``. The function itself is taken from numpy's own pickling, so no deprecated
    module is imported. ``numpy.ndarray`` is a function here, not the class: the NEWOBJ opcode, which would call the
    class's ``__new__`` past any check, takes classes only.
    """
    numpy_reconstruct = np.empty(0).__reduce__()[0]

    def with_budget(array: _BoundedArray) -> _BoundedArray:
        array._budget = budget
        return array

    def ndarray(shape, dtype=float, *buffer_offset_strides_order) -> _BoundedArray:
        dtype = _builtin_dtype(np.dtype(float) if dtype is float else dtype)
        budget.charge(_array_bytes(shape, dtype), f"numpy.ndarray({reprlib.repr(shape)}, {dtype})")
        return with_budget(_BoundedArray(shape, dtype, *buffer_offset_strides_order))

    ndarray_global = _Global("numpy.ndarray", ndarray)

    def reconstruct(subtype, shape, dtype) -> _BoundedArray:
        if subtype is not ndarray_global:
            raise _ForbiddenGlobal(f"an array of type {reprlib.repr(subtype)}")
        dtype = _builtin_dtype(dtype)
        budget.charge(_array_bytes(shape, dtype), f"an array of shape {reprlib.repr(shape)} and {dtype}")
        return with_budget(numpy_reconstruct(_BoundedArray, shape, dtype))

    reconstruct_global = _Global("numpy.core.multiarray._reconstruct", reconstruct)
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct_global,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct_global,
        ("numpy", "ndarray"): ndarray_global,
        ("numpy", "dtype"): _Global("numpy.dtype", _builtin_dtype),
    }


def _items(value: object, constructor: str) -> int:
    """At least the number of items (bytes, characters, elements) a constructor makes from ``value``."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
        return len(value)
    raise _Refused(f"it calls {constructor}() on a {type(value).__name__}")


def _bytes_cost(source: object = b"", *encoding_errors) -> int:
    """``bytes(n)`` is n zero bytes; a str encodes to up to 4 bytes a character."""
    if type(source) is int:
        return source
    return _items(source, "bytes") * (4 if isinstance(source, str) else 1)


def _container_cost(iterable: object = (), *_) -> int:
    return _ITEM_BYTES * _items(iterable, "a container")


def _scalar_cost(*args) -> int:
    """Numbers and text only (its size is in the pickle already): ``str`` of a list of a million references to one
    large string would render it a million times."""
    if not all(isinstance(arg, (str, bytes, int, float, complex)) for arg in args):
        raise _Refused(f"it converts a {', '.join(type(arg).__name__ for arg in args)} to a scalar or string")
    return 4 * sum(len(arg) for arg in args if isinstance(arg, (str, bytes)))


def _plain_builtins(budget: _Budget) -> dict[tuple[str, str], _Global]:
    """Inert container and scalar types only (no open, eval, getattr, __import__ and the like), each charging what it
    makes to ``budget``: ``bytes(200_000_000)`` is a few opcodes.

    Both module names are listed because overriding ``find_class`` skips pickle's Python 2 name mapping. Like
    ``numpy.ndarray``, each is a function, so no pickle reaches a type's ``__new__`` unchecked.
    """

    def charged(constructor: type, cost) -> _Global:
        def construct(*args):
            budget.charge(cost(*args), f"{constructor.__name__}({', '.join(map(reprlib.repr, args))})")
            return constructor(*args)

        return _Global(constructor.__name__, construct)

    costs = {"bytes": _bytes_cost, "bytearray": _bytes_cost, "str": _scalar_cost, "int": _scalar_cost,
             "float": _scalar_cost, "complex": _scalar_cost, "bool": _scalar_cost, "dict": _container_cost,
             "list": _container_cost, "tuple": _container_cost, "set": _container_cost, "frozenset": _container_cost}
    return {(module, name): charged(getattr(builtins, name), cost)
            for module in ("builtins", "__builtin__") for name, cost in costs.items()}


class _CifarBatchUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild a CIFAR-10 batch (a dict of numpy arrays, lists and strings) and nothing else,
    nor anything larger than one."""

    def __init__(self, file: IO[bytes], budget: _Budget):
        super().__init__(file, encoding="bytes")
        self._allowed = {**_numpy_array_constructors(budget), **_plain_builtins(budget)}

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _ForbiddenGlobal(f"persistent id {reprlib.repr(pid)}")


def _check_opcodes(data: bytes, budget: _Budget) -> None:
    """Refuse, before unpickling, what Python's unpickler would allocate without reading or charging it: a length
    prefix larger than the bytes that follow (it allocates the length first), a memo index beyond the opcodes read so
    far (it grows its memo table to the index), more opcodes than a batch has, a str longer than a batch's names.
    Charge ``budget`` for what each opcode makes: its argument (a str at 4 bytes a byte), and ``_ITEM_BYTES``, or
    ``_CALL_BYTES`` for an opcode that calls a constructor.

    The opcodes are read here rather than with ``pickletools.genops``, which decodes every argument: a 40 MB str
    with one astral character decodes to 160 MB. Only lengths are read, so the scan builds nothing large.
    Truncation, an unknown opcode and a missing STOP raise ValueError."""
    pos, end = 0, len(data)
    for count in range(1, MAX_BATCH_OPCODES + 2):
        if pos >= end:
            raise ValueError("pickle exhausted before seeing STOP")
        opcode = pickletools.code2op.get(chr(data[pos]))
        if opcode is None:
            raise ValueError(f"at position {pos}, opcode {data[pos:pos + 1]!r} unknown")
        if count > MAX_BATCH_OPCODES:
            raise _Refused(f"it holds more than {MAX_BATCH_OPCODES} opcodes")
        name, size, pos = opcode.name, opcode.arg.n if opcode.arg else 0, pos + 1
        if size == pickletools.UP_TO_NEWLINE:
            newline = pos - 1
            for _ in range(2 if name in ("GLOBAL", "INST") else 1):  # these two take a module line and a name line
                newline = data.find(b"\n", newline + 1)
                if newline < 0:
                    raise ValueError(f"no newline ends the argument of {name} at position {pos - 1}")
            size = newline + 1 - pos
        elif size < 0:  # a length prefix, then that many bytes
            prefix = _LENGTH_PREFIXES[size]
            if pos + struct.calcsize(prefix) > end:
                raise ValueError(f"the pickle ends within the length of {name} at position {pos - 1}")
            (size,), pos = struct.unpack_from(prefix, data, pos), pos + struct.calcsize(prefix)
            if size < 0:
                raise ValueError(f"{name} before position {pos} has a negative length {size}")
        if size > end - pos:
            raise ValueError(f"expected {size} bytes in the argument of {name}, but only {end - pos} remain")
        if name in _TEXT_OPCODES and size > MAX_TEXT_BYTES:
            raise _Refused(f"it holds a str of {size} bytes ({name}, opcode {count}), more than the "
                           f"{MAX_TEXT_BYTES} of a file name or label")
        factor = 4 if name in _TEXT_OPCODES else 2 if name in _LONG_OPCODES else 1
        budget.charge(factor * size + (_CALL_BYTES if name in _CALL_OPCODES else _ITEM_BYTES),
                      f"the object of opcode {count} ({name})")
        arg, pos = data[pos:pos + min(size, 20)], pos + size  # the memo index and frame length: 20 digits at most
        if name == "PUT" and size > 20:
            raise _Refused(f"it stores at a memo index of {size - 1} digits")
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            index = int(arg) if name == "PUT" else int.from_bytes(arg, "little")
            if not 0 <= index < count:
                raise _Refused(f"it stores at memo index {index} after only {count} opcodes")
        elif name == "FRAME" and int.from_bytes(arg, "little") > end - pos:
            raise ValueError(f"expected {int.from_bytes(arg, 'little')} bytes in a frame, but only {end - pos} remain")
        elif name == "STOP":
            return


class _MemoryFile:
    """``data`` as the unpickler reads it, without copies: every read returns a view. From ``io.BytesIO`` it gets a
    new bytes object per read, which it keeps while it copies the value out of it: twice the 30 MB of a batch's
    images (a Python 2 string, which becomes bytes by a copy)."""

    def __init__(self, data: bytes):
        self._data, self._view, self._pos = data, memoryview(data), 0

    def _take(self, end: int) -> memoryview:
        view, self._pos = self._view[self._pos:end], end
        return view

    def read(self, n: int = -1) -> memoryview:
        return self._take(len(self._data) if n < 0 else min(self._pos + n, len(self._data)))

    def readline(self) -> memoryview:
        newline = self._data.find(b"\n", self._pos)
        return self._take(len(self._data) if newline < 0 else newline + 1)

    def readinto(self, buffer) -> int:
        view = self._take(min(self._pos + len(buffer), len(self._data)))
        buffer[:len(view)] = view
        return len(view)


def check_batch_size(size: int, where: str) -> None:
    """Refuse a batch file larger than an official one before reading it."""
    if size > MAX_BATCH_BYTES:
        raise DataError(f"refusing to unpickle {where}: it is {size} bytes, more than the {MAX_BATCH_BYTES} of one "
                        f"CIFAR-10 batch; replace it with the official {ARCHIVE_NAME}")


def _unpickle_batch(data: bytes, where: str) -> object:
    check_batch_size(len(data), where)
    budget = _Budget()
    try:
        _check_opcodes(data, budget)
        batch = _CifarBatchUnpickler(_MemoryFile(data), budget).load()
    except _Refused as e:
        raise DataError(f"refusing to unpickle {where}: {e}, so it is not a CIFAR-10 batch; "
                        f"replace it with the official {ARCHIVE_NAME}") from None
    except (ValueError, pickle.UnpicklingError) as e:  # a length beyond the end, an unknown opcode, no STOP...
        raise DataError(f"{where}: cannot be read ({one_line(e)}): the file is truncated or corrupt; "
                        "replace it with a good copy") from None
    if isinstance(batch, dict):  # the arrays as plain numpy arrays, their unpickling done
        batch = {key: value.view(np.ndarray) if isinstance(value, _BoundedArray) else value
                 for key, value in batch.items()}
    return batch


def _field(batch: dict, key: str, where: str):
    """A batch field; official batches have bytes keys (b'data'), ones re-pickled by Python 3 may have str keys."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{where}: not a CIFAR-10 batch (no {key!r} entry; it has {sorted(map(repr, batch))})")


def _parse_batch(batch: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC, labels) from one batch dict holding CIFAR's channel-major rows of 3 x 32 x 32 values."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict)")
    rows, labels = _field(batch, "data", where), _field(batch, "labels", where)
    height, width, channels = IMAGE_SHAPE
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.shape[1] != height * width * channels:
        shape = getattr(rows, "shape", type(rows).__name__)
        raise DataError(f"{where}: image rows must be an array of shape (N, {height * width * channels}), got {shape}")
    images = rows.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
    return validate_arrays(images, np.asarray(labels), where)


def _assemble_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: Path) -> Cifar10:
    missing = [name for name in BATCH_NAMES if name not in batches]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}; the official CIFAR-10 holds "
                        f"{', '.join(BATCH_NAMES)}: download {ARCHIVE_NAME} again")
    x_train = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])
    y_train = np.concatenate([batches[name][1] for name in TRAIN_BATCHES])
    x_test, y_test = batches[TEST_BATCH]
    return Cifar10(np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


# ---------------------------------------------------------------------------------------------------------------------
# Loading each kind of source


def _load_tar(path: Path) -> Cifar10:
    """Read the batches straight from the archive, in one sequential pass over the gzip stream."""
    wanted = {f"{BATCH_FOLDER}/{name}": name for name in BATCH_NAMES}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with reading(path), tarfile.open(path, mode="r|gz") as tar:
        for member in tar:
            name = wanted.get(member.name.removeprefix("./"))
            if name is None or not member.isfile():
                continue
            where = f"{path}:{member.name}"
            check_batch_size(member.size, where)  # the size its header declares, before reading it
            data = _read_member(tar.extractfile(member))
            batches[name] = _parse_batch(_unpickle_batch(data, where), where)
    return _assemble_batches(batches, path)


def _read_member(f: IO[bytes] | None) -> bytes:
    if f is None:
        raise tarfile.ReadError("member has no data")
    with f:
        return f.read()


def _load_folder(folder: Path) -> Cifar10:
    batches = {}
    for name in BATCH_NAMES:
        path = folder / name
        if path.is_file():
            check_batch_size(path.stat().st_size, str(path))
            with reading(path):
                batches[name] = _parse_batch(_unpickle_batch(path.read_bytes(), str(path)), str(path))
    return _assemble_batches(batches, folder)


def _load_npz(path: Path) -> Cifar10:
    with reading(path):
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (a single .npy array); save it with numpy.savez and the "
                            f"keys {', '.join(NPZ_KEYS)}")
        with loaded as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataError(f"{path}: missing {', '.join(missing)}; an .npz source needs {', '.join(NPZ_KEYS)} "
                                f"(it has {', '.join(npz.files) or 'nothing'})")
            arrays = {key: npz[key] for key in NPZ_KEYS}
    x_train, y_train = validate_arrays(arrays["x_train"], arrays["y_train"], f"{path} (x_train, y_train)")
    x_test, y_test = validate_arrays(arrays["x_test"], arrays["y_test"], f"{path} (x_test, y_test)")
    return Cifar10(x_train, y_train, x_test, y_test)


_LOADERS = {"tar": _load_tar, "folder": _load_folder, "npz": _load_npz}


def load_source(source: Source) -> Cifar10:
    """Read and validate a source; every problem with it is a DataError naming the file."""
    log.info("reading %s", source.describe())
    return _LOADERS[source.kind](source.path)


def validate_arrays(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one split (uint8 N x 32 x 32 x 3 images, N labels in 0..9) and return it with labels as uint8."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{where}: images must have shape (N, {', '.join(map(str, IMAGE_SHAPE))}) (NHWC), "
                        f"got {x.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: holds no images")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: expected {len(x)} labels (one per image), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, got {y.min()}..{y.max()}")
    return x, y.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# The dataset hash, the split, and the prepare stage


def source_digests(source: Source) -> tuple[str, dict[str, str]]:
    """(dataset sha256, {file name: sha256}) of the raw source, logged to MLflow to identify the data.

    A single file is hashed as ``sha256sum`` would. For the extracted folder the dataset hash covers the batch
    files' contents concatenated in sorted name order (``cat data_batch_1 ... test_batch | sha256sum``).
    """
    files = [source.path / name for name in sorted(BATCH_NAMES)] if source.kind == "folder" else [source.path]
    combined, per_file = hashlib.sha256(), {}
    for path in files:
        digest = hashlib.sha256()
        with reading(path), open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                combined.update(chunk)
        per_file[path.name] = digest.hexdigest()
    return combined.hexdigest(), per_file


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into ``n`` training images: a seeded random draw, each part in original order."""
    if not 0 < val_size < n:
        raise DataError(f"data.val_size={val_size} must be at least 1 and smaller than the {n} training images; "
                        "lower it in params.yaml")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def load_images_npz(path: str | Path, key: str = "x_test", n: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images stored under ``key`` in an .npz (e.g. the lossless CIFAR-10 test subset)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    with np.load(path, allow_pickle=False) as archive:
        if key not in archive:
            raise DataError(f"{path} has no array {key!r} (it has {', '.join(archive.files)})")
        images = archive[key][:n]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}[{key}]: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


# JPEG error of the project's CIFAR-10 copy against the originals is ~30 dB; the wrong images (another order,
# another data set) measure ~10 dB. Anything below this is refused as "not the same images".
ORIGINALS_MIN_PSNR_DB = 20.0


def substitute_originals(x: np.ndarray, originals_path: str | Path, key: str) -> tuple[np.ndarray, int]:
    """``x`` with its first images replaced by their original pixels: ``originals_path``'s ``key`` array (``x_train``
    or ``x_test``) holds the official images 0..K-1 of that split, e.g. ``cifar10-lossless-subset.npz``.

    The project's offline copy was rebuilt from JPEGs; a denoiser trained on it learns JPEG's smoothing and measures
    ~0.8 dB worse at sigma 0.1 on original pixels than on JPEG pixels. Returns (images, K); K is 0 where the file has
    no ``key``.
    """
    with reading(Path(originals_path)), np.load(originals_path, allow_pickle=False) as archive:
        if key not in archive:
            return x, 0
    originals = load_images_npz(originals_path, key)
    k = len(originals)
    where = f"data.originals {originals_path}: its {key}"
    if k > len(x) or originals.shape[1:] != x.shape[1:]:
        raise DataError(f"{where} {originals.shape} does not fit the images {x.shape}: give an .npz whose "
                        f"{key} holds the first official images of that split")
    diff = originals.astype(np.float32) - x[:k].astype(np.float32)
    psnr = 10 * np.log10(255.0**2 / max(float(np.mean(diff**2)), 1e-12))
    if psnr < ORIGINALS_MIN_PSNR_DB:
        raise DataError(f"{where} is not the first {k} images of the {x.shape[0]} here (PSNR {psnr:.1f} dB "
                        "against them): check the file and its order")
    out = x.copy()
    out[:k] = originals
    return out, k


def originals_file(cfg) -> Path | None:
    """The originals file prepare uses: ``data.originals``, where ``auto`` means ``raw_dir``/originals.npz if
    present."""
    if cfg.originals == "auto":
        path = Path(cfg.raw_dir) / ORIGINALS_NPZ
        return path if path.is_file() else None
    if cfg.originals and not Path(cfg.originals).is_file():
        raise DataError(f"data.originals {cfg.originals} not found: fix the path, or set data.originals to null")
    return Path(cfg.originals) if cfg.originals else None


def split_train_val(n: int, cfg, seed: int, n_originals: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, validation) indices and how validation was chosen (``data.val_split``).

    ``originals``: the last ``val_size`` original-pixel training images, so that choices are scored on pixels no
    lossy copy touched and on images training never sees; ``random``: a seeded draw; ``auto``: originals when there
    are any."""
    mode = cfg.val_split if cfg.val_split != "auto" else ("originals" if n_originals else "random")
    if mode == "random":
        return (*split_indices(n, cfg.val_size, seed), mode)
    if not 0 < cfg.val_size < n_originals:
        raise DataError(f"data.val_split=originals takes data.val_size={cfg.val_size} of the {n_originals} "
                        "original-pixel training images (data.originals): lower data.val_size, or set "
                        "data.val_split=random")
    val_idx = np.arange(n_originals - cfg.val_size, n_originals)
    return np.setdiff1d(np.arange(n), val_idx), val_idx, mode


def prepare_cifar10(params) -> dict:
    """Load the raw data, put in the original pixels ``data.originals`` holds, split off the validation set
    (``data.val_split``), and write the splits and a manifest.

    Writes ``{train,val,test}_{x,y}.npy`` (uint8) into ``params.data.prepared_dir``, each atomically, then
    ``manifest.json`` last, so a manifest means a complete set. The test set is the official one, in its order.
    Returns the manifest.
    """
    cfg = params.data
    source = ensure_source(cfg.raw_dir, cfg.download)
    data = load_source(source)
    x_train, x_test, originals = data.x_train, data.x_test, None
    originals_path = originals_file(cfg)
    n_train_originals = 0
    if originals_path is not None:
        x_train, n_train_originals = substitute_originals(x_train, originals_path, "x_train")
        x_test, n_test_originals = substitute_originals(x_test, originals_path, "x_test")
        with reading(originals_path), open(originals_path, "rb") as f:
            originals_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        originals = {"path": str(originals_path), "sha256": originals_sha256, "count": n_train_originals,
                     "test_count": n_test_originals, "only": cfg.originals_only}
    train_idx, val_idx, val_split = split_train_val(len(x_train), cfg, params.seed, n_train_originals)
    if originals and cfg.originals_only:  # a fine-tuning set: the original-pixel training images alone
        train_idx = train_idx[train_idx < n_train_originals]
    splits = {
        "train": (x_train[train_idx], data.y_train[train_idx]),
        "val": (x_train[val_idx], data.y_train[val_idx]),
        "test": (x_test, data.y_test),
    }
    prepared_dir = Path(cfg.prepared_dir)
    # Gone first: a prepare killed midway must not leave the last manifest vouching for a mix of two splits.
    (prepared_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for split, (x, y) in splits.items():
        x_path, y_path = split_paths(prepared_dir, split)
        save_npy(x_path, x)
        save_npy(y_path, y)
    dataset_sha256, file_sha256 = source_digests(source)
    if originals:  # other pixels, another data set: runs must not resume across it
        dataset_sha256 = hashlib.sha256(f"{dataset_sha256}+{originals}".encode()).hexdigest()
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": "cifar10",
        "source": {"kind": source.kind, "path": str(source.path), "sha256": file_sha256},
        "dataset_sha256": dataset_sha256,
        "originals": originals,
        "seed": params.seed,
        "val_size": cfg.val_size,
        "val_split": val_split,
        "counts": {split: len(x) for split, (x, _) in splits.items()},
        "image_shape": list(IMAGE_SHAPE),
        "dtype": "uint8",
    }
    atomic_write_text(prepared_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    log.info("prepared %s from %s into %s", manifest["counts"], source.describe(), prepared_dir)
    return manifest


