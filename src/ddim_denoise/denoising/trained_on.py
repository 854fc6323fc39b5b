"""What data a checkpoint's model was trained on, in words, and the warning for pictures far larger than that.

A model trained on CIFAR-10 saw 32x32 thumbnails only; on full-size photos it loses to BM3D by 0.5-2 dB. A model
trained on a folder of one's own pictures (``data.source: folder``, the photos profile: docs/own-images.md) saw
``data.patch_size`` crops of them, and is at home on pictures of any size.
"""

from __future__ import annotations

from ddim_denoise.data.cifar10 import IMAGE_SHAPE
from ddim_denoise.pipeline.params import Params

CIFAR10_SIDE = IMAGE_SHAPE[0]
# A CIFAR-10 model is warned about pictures whose larger side exceeds this many times its training side
# (4 x 32 = 128 px): far larger than anything it saw.
FAR_LARGER_FACTOR = 4


def training_side(params: Params) -> int:
    """The side in pixels of the square images the model saw in training: CIFAR-10's, or the folder's crops'."""
    return CIFAR10_SIDE if params.data.source == "cifar10" else params.data.patch_size


def trained_on(params: Params) -> str:
    """The training data in words, e.g. "CIFAR-10 (32x32 thumbnails)" or "the pictures in data/photos (64x64
    crops)"."""
    side = training_side(params)
    if params.data.source == "cifar10":
        return f"CIFAR-10 ({side}x{side} thumbnails)"
    return f"the pictures in {params.data.raw_dir} ({side}x{side} crops)"


def far_larger_side(params: Params) -> int | None:
    """The side in pixels beyond which a picture is far larger than the model was trained on; None where no size is
    (a folder-trained model, whose crops come from pictures of any size)."""
    return FAR_LARGER_FACTOR * training_side(params) if params.data.source == "cifar10" else None


def far_larger_warning(params: Params, height: int, width: int) -> str | None:
    """The one-line warning for a ``height`` x ``width`` picture far larger than the model was trained on (a
    CIFAR-10 model and a larger side over ``far_larger_side``), naming the fix; None when there is nothing to say."""
    limit = far_larger_side(params)
    if limit is None or max(height, width) <= limit:
        return None
    return (f"this model was trained on {trained_on(params)} and will likely do worse than BM3D on pictures this size "
            f"({width}x{height}, over {limit} px on a side); train one on your own pictures with data.source: folder "
            "(the photos profile; docs/own-images.md)")
