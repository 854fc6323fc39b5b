"""A folder of your own pictures as the data source (``data.source: folder``, the pictures in ``data.raw_dir``).

Every file the project reads (PNG, JPEG, TIFF, WebP, .npy; 8/16-bit or float; gray or colour; any size) is decoded
once, to 8-bit RGB: gray is replicated to three channels and alpha dropped, as the model sees colour, and 16-bit is
rounded to 8 bits, an error (0.001 RMS) far below the smallest noise the model removes. Files that are unreadable,
smaller than ``data.patch_size`` or a pixel-for-pixel duplicate of an earlier file are listed one line each, then
skipped or refused (``data.bad_files``).

The split is by file, seeded (``data.test_files``, ``data.val_files``: a fraction, a count or the names), so no
picture lends crops to two splits. ``prepare_folder`` writes the train and test pictures whole, for patch training
(``patches.PatchSource``) and whole-image evaluation; validation is ``data.val_size`` fixed random crops in
``val_x.npy``, the form every validation score (training, sweeps) already reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddim_denoise.data.image_io import read_image
from ddim_denoise.data.patches import random_crops
from ddim_denoise.data.prepared import MANIFEST_FORMAT, dataset_name, read_manifest, reading, save_npy
from ddim_denoise.pipeline.checkpoint import atomic_path, atomic_write_text
from ddim_denoise.pipeline.errors import DataError, InputError
from ddim_denoise.pipeline.files import MANIFEST_FILE

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".npy")
WHOLE_SPLITS = ("train", "val", "test")  # each kept whole in {split}_images.npz


@dataclass
class Picture:
    name: str  # the path relative to the folder, with forward slashes
    pixels: np.ndarray  # uint8 (H, W, 3)
    file_sha256: str


def picture_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), by name; hidden files and folders are left out."""
    if not folder.is_dir():
        raise DataError(f"data.raw_dir {folder} is not a folder: with data.source=folder it holds your pictures")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def read_pictures(folder: Path, patch_size: int) -> tuple[list[Picture], list[tuple[str, str]]]:
    """The usable pictures, and (name, why) of each file left out: unreadable, too small, or a duplicate."""
    pictures, left_out, seen = [], [], {}
    for path in picture_files(folder):
        name = path.relative_to(folder).as_posix()
        try:
            pixels = to_uint8(read_image(path).rgb)
        except InputError as e:
            left_out.append((name, str(e).removeprefix(f"{path}: ")))
            continue
        h, w = pixels.shape[:2]
        pixel_digest = hashlib.sha256(pixels.tobytes() + bytes(f"{h}x{w}", "ascii")).hexdigest()
        if min(h, w) < patch_size:
            left_out.append((name, f"{w}x{h} pixels, smaller than data.patch_size={patch_size}"))
        elif pixel_digest in seen:
            left_out.append((name, f"the same pixels as {seen[pixel_digest]}"))
        else:
            seen[pixel_digest] = name
            pictures.append(Picture(name, pixels, hashlib.sha256(path.read_bytes()).hexdigest()))
    return pictures, left_out


def _share(share: float | int | list[str], names: list[str], setting: str) -> int | list[str]:
    """A split's size from a fraction or a count, or its names, checked against the usable ``names``."""
    if isinstance(share, list):
        missing = [n for n in share if n not in names]
        if missing:
            raise DataError(f"{setting} names {', '.join(missing)}, not among the usable pictures: fix the names "
                            "(paths relative to data.raw_dir)")
        return share
    return max(1, round(share * len(names))) if isinstance(share, float) else share


def split_by_file(names: list[str], val_files, test_files, seed: int) -> dict[str, list[str]]:
    """{train, val, test}: file names, each part in name order. Named files go where named; the counts are drawn
    from the rest, test first, by a seeded permutation."""
    test, val = _share(test_files, names, "data.test_files"), _share(val_files, names, "data.val_files")
    named = set(test if isinstance(test, list) else []) | set(val if isinstance(val, list) else [])
    rest = [names[i] for i in np.random.default_rng(seed).permutation(len(names)) if names[i] not in named]
    parts = {}
    for split, share in (("test", test), ("val", val)):
        if isinstance(share, int):
            share, rest = rest[:share], rest[share:]
        parts[split] = sorted(share)
    parts["train"] = sorted(rest)
    if not all(parts.values()) or set(parts["test"]) & set(parts["val"]):
        counts = ", ".join(f"{len(v)} {k}" for k, v in parts.items())
        raise DataError(f"the {len(names)} usable pictures split into {counts} files: each split needs at least one "
                        "and no file may be in two; add pictures or change data.val_files / data.test_files")
    return {split: parts[split] for split in WHOLE_SPLITS}


def _save_pictures(path: Path, pictures: list[np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, *pictures)  # arr_0, arr_1, ... in split order: the names are in the manifest


def load_images(prepared_dir: str | Path, split: str) -> list[np.ndarray]:
    """The whole uint8 (H, W, 3) pictures of a prepared folder source's split, in the manifest's order."""
    manifest = read_manifest(prepared_dir)
    if dataset_name(manifest) != "folder":
        raise DataError(f"{prepared_dir} holds {dataset_name(manifest)}, not a folder of pictures: whole pictures "
                        "come from data.source=folder")
    path = Path(prepared_dir) / f"{split}_images.npz"
    with reading(path), np.load(path, allow_pickle=False) as archive:
        pictures = [archive[f"arr_{i}"] for i in range(len(manifest["split"][split]))]
    return pictures


def prepare_folder(params) -> dict:
    """Read, check and split ``data.raw_dir``'s pictures; write the splits and a manifest (last, as ``prepare``)."""
    cfg = params.data
    folder, prepared_dir = Path(cfg.raw_dir), Path(cfg.prepared_dir)
    pictures, left_out = read_pictures(folder, cfg.patch_size)
    for name, why in left_out:
        log.warning("%s %s: %s", "refusing" if cfg.bad_files == "refuse" else "skipping", name, why)
    if left_out and cfg.bad_files == "refuse":
        raise DataError(f"{len(left_out)} file(s) in {folder} cannot be used (listed above): fix or remove them, or "
                        "set data.bad_files=skip")
    by_name = {p.name: p for p in pictures}
    split = split_by_file(list(by_name), cfg.val_files, cfg.test_files, params.seed)
    val_pictures = [torch.from_numpy(by_name[n].pixels) for n in split["val"]]
    val_crops = random_crops(val_pictures, cfg.val_size, cfg.patch_size, torch.Generator().manual_seed(params.seed))

    (prepared_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for name, pixels in (("val_x.npy", val_crops.numpy()), ("val_y.npy", np.zeros(cfg.val_size, np.uint8))):
        save_npy(prepared_dir / name, pixels)
    for part, names in split.items():
        _save_pictures(prepared_dir / f"{part}_images.npz", [by_name[n].pixels for n in names])
    file_sha256 = {p.name: p.file_sha256 for p in pictures}
    # The pictures, the split and the crops define what a run learns: runs resume only on the same
    identity = json.dumps([file_sha256, split, cfg.patch_size, cfg.val_size], sort_keys=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": "folder",
        "source": {"kind": "folder", "path": str(folder), "sha256": file_sha256},
        "dataset_sha256": hashlib.sha256(identity.encode()).hexdigest(),
        "originals": None,
        "seed": params.seed,
        "val_size": cfg.val_size,
        "val_split": "by file",
        "split": split,
        "left_out": [{"file": name, "why": why} for name, why in left_out],
        "counts": {"train": len(split["train"]), "val": cfg.val_size, "test": len(split["test"])},
        "patch_size": cfg.patch_size,
        "image_shape": [cfg.patch_size, cfg.patch_size, 3],  # of the fixed-size split (the validation crops)
        "dtype": "uint8",
    }
    atomic_write_text(prepared_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    log.info("prepared %d train / %d val / %d test pictures (%d validation crops of %dx%d) from %s into %s",
             *(len(split[s]) for s in WHOLE_SPLITS), cfg.val_size, cfg.patch_size, cfg.patch_size, folder,
             prepared_dir)
    return manifest
