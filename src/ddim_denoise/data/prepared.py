"""The prepared data folder, whatever the source: its files, its manifest, the splits read back, and the words and
identity a run is tagged with.

Fixed-size splits are ``{split}_x.npy`` / ``{split}_y.npy`` (uint8 NHWC images, uint8 labels): all three for
CIFAR-10, the validation crops for a folder of pictures (whose whole pictures are in ``{split}_images.npz``:
``folder.load_images``). ``manifest.json`` is written last, so a manifest means a complete set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ddim_denoise.pipeline.checkpoint import atomic_path
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.files import MANIFEST_FILE

SPLITS = ("train", "val", "test")
MANIFEST_FORMAT = "ddim-denoise-data/1"
CIFAR10_SHAPE = (32, 32, 3)  # the fixed-size splits' image shape when a manifest names none


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Report any failure to parse ``path`` (truncated gzip, bad zip, garbage pickle...) as one DataError line."""
    try:
        yield
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # tarfile/zipfile/zlib/EOF/pickle/ValueError and whatever else a corrupt file provokes
        raise DataError(f"{path}: cannot be read ({one_line(e)}): the file is truncated or corrupt; "
                        "replace it with a good copy") from e


def split_paths(prepared_dir: Path, split: str) -> tuple[Path, Path]:
    return prepared_dir / f"{split}_x.npy", prepared_dir / f"{split}_y.npy"


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def dataset_name(manifest: dict) -> str:
    """``cifar10`` or ``folder`` (data.source); manifests from before folders existed are CIFAR-10's."""
    return manifest.get("dataset", "cifar10")


def data_identity(manifest: dict) -> str:
    """What a run trains and validates on: the data set and how prepare split it. Runs and sweep studies resume only
    on the same; a larger data.val_size would move images a checkpoint trained on into validation."""
    identity = f"{manifest['dataset_sha256']}/seed {manifest['seed']}/val_size {manifest['val_size']}"
    return identity + ("/validation on originals" if manifest.get("val_split") == "originals" else "")


def manifest_tags(manifest: dict) -> dict[str, str]:
    """MLflow tags saying which data a run trained and validated on: the source, the originals, the split."""
    source, originals = manifest["source"], manifest.get("originals")
    tags = {"data_source": f"{source['kind']} {source['path']}",
            "data_originals": (f"{originals['path']} ({originals['count']} train, "
                               f"{originals.get('test_count', 0)} test)" if originals else "none"),
            "data_val_split": f"{manifest.get('val_split', 'random')}, {manifest['val_size']} images"}
    if dataset_name(manifest) == "folder":
        split, patch = manifest["split"], manifest["patch_size"]
        tags["data_val_split"] = (f"by file (seed {manifest['seed']}): {len(split['train'])} train, "
                                  f"{len(split['val'])} val, {len(split['test'])} test pictures; "
                                  f"{manifest['val_size']} validation crops of {patch}x{patch}")
        tags["data_test_files"] = ", ".join(split["test"])[:5000]  # MLflow caps a tag's length
        tags["data_sha256"] = manifest["dataset_sha256"]
    return tags


def read_manifest(prepared_dir: str | Path) -> dict:
    """The manifest prepare wrote; a DataError saying to run prepare if there is none."""
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{prepared_dir}: no prepared data ({MANIFEST_FILE} missing): run `ddim-denoise prepare` "
                        "(or `dvc repro prepare`) first")
    with reading(path):
        return json.loads(path.read_text())


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, uint8 labels) of one prepared fixed-size split: ``train``, ``val`` or ``test``
    (a folder of pictures has ``val`` only; its whole pictures: ``folder.load_images``)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    manifest = read_manifest(prepared_dir)
    if dataset_name(manifest) == "folder" and split != "val":
        raise DataError(f"{prepared_dir} holds whole pictures for its {split} split, not fixed-size images: "
                        "read them with folder.load_images")
    where = f"{prepared_dir} ({split} split)"
    arrays = []
    for path in split_paths(Path(prepared_dir), split):
        if not path.is_file():
            raise DataError(f"{path} is missing: run `ddim-denoise prepare` (or `dvc repro prepare`) again")
        with reading(path):
            arrays.append(np.load(path, allow_pickle=False))
    x, y = arrays
    shape = tuple(manifest.get("image_shape", CIFAR10_SHAPE))
    if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) == 0 or y.shape != (len(x),):
        raise DataError(f"{where}: expected uint8 images (N, {', '.join(map(str, shape))}) and N labels, got "
                        f"{x.dtype} {x.shape} and labels {y.shape}: run `ddim-denoise prepare` again")
    return x, y.astype(np.uint8)


def prepare(params) -> dict:
    """The prepare stage: ``data.source``'s data split and written into ``data.prepared_dir``; returns the manifest."""
    from ddim_denoise.data import cifar10, folder

    return (folder.prepare_folder if params.data.source == "folder" else cifar10.prepare_cifar10)(params)
