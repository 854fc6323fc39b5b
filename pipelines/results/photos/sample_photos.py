"""Copy the photos scikit-image ships into a folder: the worked example's pictures (docs/own-images.md).

    python pipelines/results/photos/sample_photos.py OUT_DIR

Natural photos and micrographs only: the synthetic images (chessboard, colour wheel, logo, phantom, horse) and the
second view of the stereo pair are left out. The study tests on astronaut, coffee and chelsea and trains and
validates on the rest (params.yaml: data.test_files).
"""

import shutil
import sys
from pathlib import Path

from skimage.data import data_dir

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "brick.png", "camera.png", "cell.png", "clock_motion.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
          "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python sample_photos.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copyfile(Path(data_dir) / name, out / name)
    print(f"copied {len(PHOTOS)} photos into {out}")
