"""Fuzzing the image decoders: small valid PNG, JPEG, TIFF, WebP and .npy files with random bytes changed, inserted,
deleted or cut off. Every case must end in a decoded image or the one-line ``InputError``, never another exception
(which the command line would show as a traceback and the server as a 500)."""

from __future__ import annotations

import io
from collections import Counter
from datetime import timedelta

import numpy as np
from denoise_fixtures import encode_with_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddim_denoise.data.image_io import DecodedImage, DecodeLimits, decode_image
from ddim_denoise.pipeline.errors import InputError

CASES = 1000  # fixed and derandomized: the same cases on every run, a few seconds
LIMITS = DecodeLimits(max_pixels=64 * 64)  # a mutated header declaring a large image is refused, not decoded
MAX_MUTATIONS = 4
HEADER_BYTES = 256  # PNG's IHDR, TIFF's first tags, WebP's and .npy's headers, JPEG's frame header (SOF)
# A case that takes longer fails: a decoder stuck in a corrupt file (a loop of TIFF pages it kept walking) is a hung
# request on the server. Each case takes milliseconds; the margin is for two busy cores.
CASE_DEADLINE = timedelta(seconds=5)


def seed_files() -> dict[str, bytes]:
    """One small valid file per decoder path: 8- and 16-bit PNG, JPEG, plain and compressed TIFF, lossless and lossy
    WebP, .npy."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    rgba16 = rng.integers(0, 65536, (8, 9, 4), dtype=np.uint16)
    files = {"png8": encode_with_reference("png", rgb8), "png16": encode_with_reference("png", rgba16),
             "jpeg": encode_with_reference("jpeg", rgb8), "tiff": encode_with_reference("tiff", rgba16),
             "webp_lossless": encode_with_reference("webp", rgb8), "npy": encode_with_reference("npy", rgb8 / 255)}
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb8, photometric="rgb", compression="zlib")
    files["tiff_zlib"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb8).save(buffer, "WEBP", quality=80)
    files["webp_lossy"] = buffer.getvalue()
    return files


SEEDS = seed_files()


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, MAX_MUTATIONS))):
        last = max(len(data) - 1, 0)  # half the mutations hit the headers, where the sizes and lengths are
        at = draw(st.integers(0, min(last, HEADER_BYTES)) | st.integers(0, last))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))  # the values that break length fields
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
    return name, bytes(data)


def test_mutated_image_files_decode_or_fail_with_the_one_line_error():
    outcomes: Counter = Counter()

    @settings(max_examples=CASES, derandomize=True, database=None, deadline=CASE_DEADLINE,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_files())
    def decode_or_refuse(case):
        name, data = case
        try:
            image = decode_image(data, source=name, limits=LIMITS)
        except InputError as e:
            assert "\n" not in str(e), f"{name}: a multi-line error: {e!r}"
            outcomes["refused"] += 1
        else:
            assert isinstance(image, DecodedImage) and image.rgb.dtype == np.float32 and image.rgb.ndim == 3
            outcomes["decoded"] += 1

    decode_or_refuse()
    tried = sum(outcomes.values())
    print(f"fuzzed the decoders with {tried} mutated files: {outcomes['decoded']} decoded, "
          f"{outcomes['refused']} refused in one line")
    assert tried >= CASES // 2 and outcomes["decoded"] and outcomes["refused"]
