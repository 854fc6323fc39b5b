"""The compact data bundle a GPU machine gets (``pack``, here), and cifar10.npz built from it there (``unpack``).

The device machine is offline and takes at most 64 MiB of files, so the run carries the 50,000 training images as
JPEG bytes (the train part of ../shared/data/cifar10-jpeg.npz, 46 MB) and the lossless subset (original pixels of
train images 0-3999 for the phase-2 fine-tune and of test images 0-999 for the figures, 14 MB), and decodes them there.

    python benchmarks/gpu_prepare_data.py pack ../shared/data .gpu        # here, once
    python benchmarks/gpu_prepare_data.py unpack .gpu data/raw/cifar10.npz  # on the GPU machine
"""

import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LOSSLESS = "cifar10-lossless-subset.npz"


def decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.stack([np.array(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def pack(shared: Path, bundle: Path) -> None:
    bundle.mkdir(parents=True, exist_ok=True)
    with np.load(shared / "cifar10-jpeg.npz") as jpeg:
        np.savez(bundle / "train_jpeg.npz", train_jpeg=jpeg["train_jpeg"], train_offsets=jpeg["train_offsets"],
                 y_train=jpeg["y_train"])
    shutil.copyfile(shared / LOSSLESS, bundle / LOSSLESS)
    print(f"wrote {bundle}/train_jpeg.npz and {bundle}/{LOSSLESS}")


def unpack(bundle: Path, out: Path) -> None:
    with np.load(bundle / "train_jpeg.npz") as train, np.load(bundle / LOSSLESS) as lossless:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, x_train=decode(train["train_jpeg"], train["train_offsets"]), y_train=train["y_train"],
                 x_test=lossless["x_test"], y_test=lossless["y_test"])
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit("usage: gpu_prepare_data.py pack SHARED_DATA_DIR BUNDLE_DIR | unpack BUNDLE_DIR OUT.npz")
    {"pack": pack, "unpack": unpack}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
