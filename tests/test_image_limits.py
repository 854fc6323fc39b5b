"""Image sizes are bounded before decoding: a small file that declares a huge image is refused in one line."""

from __future__ import annotations

import io
import signal
import struct

import numpy as np
import pytest
from denoise_fixtures import encode_with_reference, write_tiny_checkpoint
from typer.testing import CliRunner

import ddim_denoise.data.image_io as image_io
from ddim_denoise.cli import app
from ddim_denoise.data.image_io import DecodeLimits, decode_image, image_pixels, read_image
from ddim_denoise.pipeline.errors import InputError

H, W = 12, 10
PIXELS = {
    "png": np.zeros((H, W, 3), np.uint8),
    "jpeg": np.zeros((H, W, 3), np.uint8),
    "tiff": np.zeros((H, W, 4), np.uint16),
    "webp": np.zeros((H, W, 3), np.uint8),
    "npy": np.zeros((H, W), np.float32),
}


def png_bomb() -> bytes:
    """The issue's file: 8,841 bytes of PNG that decode to a 3000 x 3000 gray image, 108 MB as float32 RGB."""
    import imagecodecs

    return bytes(imagecodecs.png_encode(np.zeros((3000, 3000), np.uint8), level=9))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) is edited to declare another size: what a bomb looks like to a reader."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("fmt", sorted(PIXELS))
def test_every_format_declares_its_pixels_and_one_more_than_the_limit_is_refused(fmt):
    data = encode_with_reference(fmt, PIXELS[fmt])
    assert image_pixels(data) == H * W
    assert decode_image(data, limits=DecodeLimits(max_pixels=H * W)).rgb.shape == (H, W, 3)
    with pytest.raises(InputError, match=f"f: the image has {H * W} pixels, over the limit of {H * W - 1}; crop or "
                                         "downscale it, or raise --max-pixels"):
        decode_image(data, source="f", limits=DecodeLimits(max_pixels=H * W - 1))


def test_the_8_kb_png_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    import imagecodecs

    data = png_bomb()
    assert len(data) == 8841
    monkeypatch.setattr(imagecodecs, "png_decode", lambda *args, **kwargs: pytest.fail("the PNG was decoded"))
    with pytest.raises(InputError, match="9,000,000 pixels, over the limit of 1,000,000"):
        decode_image(data, limits=DecodeLimits(max_pixels=1_000_000))


@pytest.mark.parametrize("side", [10_000, 60_000])  # Pillow warns above 89.5 MP and raises above twice that
def test_pillows_decompression_bomb_warning_and_error_become_the_one_line_error(side):
    with pytest.raises(InputError, match="refused by Pillow's decompression-bomb check"):
        decode_image(jpeg_declaring(side, side), limits=DecodeLimits(max_pixels=side * side))


def test_an_npy_header_declaring_more_than_the_file_holds_allocates_nothing():
    """``np.load`` allocated what a header declared before reading: 100 bytes could ask for 80 GB."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 2)))
    bomb = buffer.getvalue().replace(b"(2, 2)", b"(100000, 100000)")
    with pytest.raises(InputError, match="truncated: its header declares 80,000,000,000 bytes"):
        decode_image(bomb, limits=DecodeLimits(max_pixels=10**10))
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()]), allow_pickle=True)
    with pytest.raises(InputError, match="holds Python objects"):
        decode_image(buffer.getvalue())


def test_a_file_larger_than_any_allowed_image_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "METADATA_BYTES", 0)
    limits = DecodeLimits(max_pixels=10)  # 320 bytes: ten RGBA float64 pixels
    path = tmp_path / "large.npy"
    path.write_bytes(encode_with_reference("npy", np.zeros((8, 8))))  # 640 bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("the file was read"))
    with pytest.raises(InputError, match=r"large.npy: the file is \d+ bytes, more than any image within the limit "
                                         r"of 10 pixels needs \(320\)"):
        read_image(path, limits)


def test_the_denoise_command_takes_max_pixels(tmp_path, tiny_params):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    for max_pixels, message in [("1000000", "bomb.png: the image has 9,000,000 pixels, over the limit of 1,000,000"),
                                ("0", "--max-pixels must be a whole number of pixels >= 1")]:
        result = CliRunner().invoke(app, ["denoise", str(tmp_path / "bomb.png"), "-o", str(tmp_path / "out"),
                                          "--sigma", "0.1", "-c", str(checkpoint), "--no-progress",
                                          "--max-pixels", max_pixels])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and lines == [f"error: {lines[0][7:]}"] and message in lines[0], result.output


def tiff_with_looping_pages(pages: int = 200) -> bytes:
    """A valid one-page TIFF whose page links on to ``pages`` empty pages (IFDs without tags), the last linking back
    to the first of them: 1.4 kB that tifffile's loop detection, which looks back only so far, does not catch."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((4, 4), np.uint8))
    data = bytearray(buffer.getvalue())
    first_page = struct.unpack("<I", data[4:8])[0]
    link = first_page + 2 + 12 * struct.unpack("<H", data[first_page:first_page + 2])[0]
    loop_start = len(data)
    data[link:link + 4] = struct.pack("<I", loop_start)
    for index in range(pages):
        following = loop_start if index == pages - 1 else len(data) + 6
        data += struct.pack("<HI", 0, following)
    return bytes(data)


def test_a_tiff_whose_pages_link_in_a_loop_is_refused_at_once():
    """Grouping the pages into series walked their links: a loop kept the decoder (and a server thread) busy for
    good. Only the first page's link is read now."""

    def too_slow(*args):
        raise TimeoutError("the TIFF decoder is still walking the page loop")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        with pytest.raises(InputError, match="multi-page TIFFs are not supported"):
            decode_image(tiff_with_looping_pages())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_garbled_npy_header_is_the_one_line_error():
    """A header length pointing past the header, into the data, made NumPy's header parser raise tokenize's
    TokenError (not a ValueError)."""
    data = bytearray(encode_with_reference("npy", np.zeros((4, 5), np.uint8)))
    data[8:10] = (0x176).to_bytes(2, "little")
    with pytest.raises(InputError, match="cannot read the .npy header"):
        decode_image(bytes(data) + b"(" * 400)  # an open bracket: tokenize looks for its end


def test_a_tiff_size_tag_holding_two_values_is_the_one_line_error():
    """Found by tests/test_decode_fuzz.py: an ImageWidth tag with two values made the pixel count a tuple, and the
    limit check raised TypeError."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((4, 4), np.uint8))
    data = bytearray(buffer.getvalue())
    first_page = struct.unpack("<I", data[4:8])[0]
    tags = struct.unpack("<H", data[first_page:first_page + 2])[0]
    for entry in range(first_page + 2, first_page + 2 + 12 * tags, 12):  # 12-byte entries: tag, type, count, value
        if struct.unpack("<H", data[entry:entry + 2])[0] == 256:  # ImageWidth: a SHORT or LONG, count 1
            data[entry + 2:entry + 8] = struct.pack("<HI", 3, 2)  # two SHORTs, stored in the entry itself
    with pytest.raises(InputError, match="malformed image size tags"):
        decode_image(bytes(data))
