"""Build data/raw/cifar10.npz on a GPU machine from the compact copies that travel with the working tree.

The device machine is offline and takes at most 64 MiB of files, so the run carries the 50,000 training images as
JPEG bytes (train part of ../shared/data/cifar10-jpeg.npz) and the 1000 lossless test images, and decodes them here.

    python benchmarks/gpu_prepare_data.py SRC_DIR OUT.npz
"""

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.stack([np.array(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    train = np.load(src / "train_jpeg.npz")
    test = np.load(src / "lossless_test.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=decode(train["train_jpeg"], train["train_offsets"]), y_train=train["y_train"],
             x_test=test["x_test"], y_test=test["y_test"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
