"""Image files in and out: PNG, JPEG, TIFF, WebP and ``.npy``, written back the way they came in.

The model sees float32 RGB on the [0, 1] scale; files hold 8- or 16-bit integers (or floats, for TIFF and .npy),
grayscale or colour, with or without alpha. ``decode_image`` turns any of them into the model's RGB plus what is
needed to undo the conversion (``ImageLayout``), and ``encode_image`` undoes it: grayscale is replicated to three
channels on the way in and averaged back to one on the way out, alpha is set aside untouched and reattached, and the
output keeps the input's format and bit depth.

The format is recognised from the file's first bytes, not its name, so a renamed file still reads and a text file
called ``x.png`` fails with one clear line. Decoders are chosen for full bit depth: Pillow reads a 16-bit RGB PNG as
8-bit, so PNG goes through ``imagecodecs`` (libpng) and TIFF through ``tifffile``; JPEG and WebP (8-bit only)
go through Pillow, which keeps their ICC profile and EXIF. PNG and TIFF outputs keep the input's ICC profile and
orientation too (``extras``), and TIFF its kind of alpha (associated or not).

Palette and 1/2/4-bit PNGs are expanded on reading, so their output is an 8-bit RGB(A) or grayscale PNG. A JPEG
with extra images appended (MPO: an Ultra HDR gain map, a depth map) is read as its main image, and written back as
a plain JPEG. Floats must be on the [0, 1] scale: a float image on the 0-255 scale is refused, not whitened.

Sizes are bounded before anything is decoded (``DecodeLimits``): the file's size, then the pixel count its header
declares, read without decoding the pixels (PNG's IHDR, Pillow's lazy open, the first TIFF page's tags, the .npy
header). A small file that declares a huge image (a decompression bomb) is refused in one line, never decoded.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ddim_denoise.pipeline.checkpoint import atomic_path
from ddim_denoise.pipeline.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg", "tiff", "webp", "npy")
DEFAULT_QUALITY = 95  # JPEG / lossy WebP quality of the written result
INTEGER_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CHANNEL_LAYOUTS = {1: "grayscale", 2: "grayscale + alpha", 3: "RGB", 4: "RGBA"}
# Floats beyond these are on another scale (0-255, 0-65535), not [0, 1] with noise straying a little outside it
FLOAT_RANGE = (-1.0, 2.0)

# 64 megapixels: above the largest common camera sensors (61 MP full frame, 50 MP phones), so real photos pass, while
# an image in flight (decoded pixels, float32 RGB, the tiles' float32 accumulators, the output: tens of bytes per
# pixel) stays within a few GB of memory. Larger images are refused unless the limit is raised.
DEFAULT_MAX_PIXELS = 64_000_000
WIDEST_PIXEL_BYTES = 4 * 8  # RGBA float64 (.npy): no file holding an allowed image needs more per pixel ...
METADATA_BYTES = 16 * 2**20  # ... plus its headers and metadata (ICC profile, EXIF)


@dataclass(frozen=True)
class DecodeLimits:
    """What one image file may cost to decode. ``setting`` names where the user raises the limit (for the error)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    setting: str = "--max-pixels"

    def validate(self) -> "DecodeLimits":
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise InputError(f"{self.setting} must be a whole number of pixels >= 1, got {self.max_pixels!r}")
        return self

    @property
    def max_file_bytes(self) -> int:
        """The largest file an image within ``max_pixels`` can need: stored uncompressed at the widest pixel type."""
        return self.max_pixels * WIDEST_PIXEL_BYTES + METADATA_BYTES

    def check_file_bytes(self, size: int, source: str) -> None:
        if size > self.max_file_bytes:
            raise InputError(f"{source}: the file is {size:,} bytes, more than any image within the limit of "
                             f"{self.max_pixels:,} pixels needs ({self.max_file_bytes:,}); raise {self.setting} if "
                             "the image is that large")

    def check_pixels(self, pixels: int, source: str) -> None:
        if pixels > self.max_pixels:
            raise InputError(f"{source}: the image has {pixels:,} pixels, over the limit of {self.max_pixels:,}; "
                             f"crop or downscale it, or raise {self.setting}")


@dataclass(frozen=True)
class ImageLayout:
    """How a file stored its pixels: enough to write the denoised RGB back in the same form."""

    format: str  # one of FORMATS
    dtype: np.dtype  # uint8, uint16, float32 or float64 (floats: TIFF and .npy only, on the [0, 1] scale)
    shape: tuple[int, ...]  # the stored array's shape: (H, W) or (H, W, C)
    extras: dict = field(default_factory=dict)  # codec details carried across: ICC profile, EXIF, orientation, ...

    @property
    def channels(self) -> int:
        return 1 if len(self.shape) == 2 else self.shape[2]

    @property
    def gray(self) -> bool:
        return self.channels in (1, 2)

    @property
    def has_alpha(self) -> bool:
        return self.channels in (2, 4)

    def describe(self) -> str:
        return f"{self.format.upper()} {self.shape[1]}x{self.shape[0]} {CHANNEL_LAYOUTS[self.channels]} {self.dtype}"


@dataclass
class DecodedImage:
    rgb: np.ndarray  # float32 (H, W, 3) on the [0, 1] scale: what the model denoises
    alpha: np.ndarray | None  # (H, W), the stored values and dtype, reattached unchanged on writing
    layout: ImageLayout


def sniff_format(data: bytes) -> str | None:
    """The format from the magic bytes at the start of a file, or None when it is none of FORMATS."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF, both byte orders
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    return None


# --- pixel arrays <-> the model's RGB ------------------------------------------------------------------------------

def _scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0


def split_channels(pixels: np.ndarray, fmt: str, source: str, extras: dict | None = None) -> DecodedImage:
    """Stored pixels (H, W) or (H, W, C) -> float RGB for the model, alpha set aside, and the layout to undo it."""
    if not pixels.dtype.isnative:  # a big-endian .npy: the same values in this machine's byte order
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if pixels.dtype not in INTEGER_DTYPES + FLOAT_DTYPES:
        raise InputError(f"{source}: pixel type {pixels.dtype} is not supported (use 8- or 16-bit integers, or "
                         "floats on the [0, 1] scale)")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in CHANNEL_LAYOUTS):
        raise InputError(f"{source}: array of shape {pixels.shape} is not one image; expected (H, W) or (H, W, C) "
                         "with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise InputError(f"{source}: the image is empty (shape {pixels.shape})")
    layout = ImageLayout(fmt, pixels.dtype, tuple(pixels.shape), extras or {})
    planes = pixels.reshape(*pixels.shape[:2], -1)
    color = planes[..., :1] if layout.gray else planes[..., :3]
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range: inf, refused just below
        rgb = color.astype(np.float32) / np.float32(_scale(pixels.dtype))
    if not np.all(np.isfinite(rgb)):
        raise InputError(f"{source}: the image holds NaN or infinite values")
    if pixels.dtype.kind == "f" and not FLOAT_RANGE[0] <= rgb.min() <= rgb.max() <= FLOAT_RANGE[1]:
        raise InputError(f"{source}: float pixels range from {rgb.min():.4g} to {rgb.max():.4g}; floats must be on "
                         "the [0, 1] scale: divide by 255 (8-bit data) or 65535 (16-bit data)")
    if layout.gray:
        rgb = np.repeat(rgb, 3, axis=2)
    alpha = planes[..., -1].copy() if layout.has_alpha else None
    return DecodedImage(np.ascontiguousarray(rgb), alpha, layout)


def merge_channels(rgb: np.ndarray, layout: ImageLayout, alpha: np.ndarray | None) -> np.ndarray:
    """Denoised float RGB -> an array stored like the input: same dtype, channel count and shape; alpha reattached."""
    color = rgb.mean(axis=2, keepdims=True) if layout.gray else rgb
    if layout.dtype.kind == "u":
        scale = _scale(layout.dtype)
        color = np.clip(np.rint(color * scale), 0, scale)
    color = color.astype(layout.dtype)
    if layout.has_alpha:
        color = np.concatenate([color, alpha[..., None].astype(layout.dtype)], axis=2)
    return color.reshape(layout.shape)


# --- codecs: bytes <-> stored pixel arrays --------------------------------------------------------------------------

# Chunks copied from the input PNG to the output as they are: the colour space (ICC profile, sRGB, gamma, primaries,
# cICP) and EXIF, which holds the orientation. imagecodecs (libpng) neither returns nor writes them, and Pillow, which
# does, cannot write 16-bit colour PNGs; all of them may sit between IHDR and the pixels, where they are written.
PNG_KEPT_CHUNKS = (b"iCCP", b"sRGB", b"gAMA", b"cHRM", b"cICP", b"eXIf")
PNG_IHDR_END = 8 + 12 + 13  # the signature, then IHDR: length, type, its 13 bytes, CRC


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, contents) of each chunk of a PNG file, in order."""
    offset = 8  # past the signature
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        yield data[offset + 4:offset + 8], data[offset + 8:offset + 8 + size]
        offset += 12 + size  # length, type, contents, CRC


def _png_chunk(kind: bytes, contents: bytes) -> bytes:
    return len(contents).to_bytes(4, "big") + kind + contents + zlib.crc32(kind + contents).to_bytes(4, "big")


def _png_pixels(data: bytes, source: str) -> int:
    """Width x height from the IHDR chunk, which the PNG standard puts first."""
    if len(data) < PNG_IHDR_END or data[12:16] != b"IHDR":
        raise InputError(f"{source}: cannot decode the PNG (it does not start with an IHDR header)")
    return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")


def _decode_png(data: bytes, source: str) -> tuple[np.ndarray, dict]:
    import imagecodecs

    chunks = list(_png_chunks(data))
    if any(kind == b"acTL" for kind, _ in chunks):  # APNG: libpng would quietly give its first frame
        raise InputError(f"{source}: animated images are not supported")
    try:
        pixels = imagecodecs.png_decode(data)
    except Exception as e:  # libpng's errors come as several exception types
        raise InputError(f"{source}: cannot decode the PNG ({e})") from None
    return pixels, {"png_chunks": [(kind, contents) for kind, contents in chunks if kind in PNG_KEPT_CHUNKS]}


def _encode_png(pixels: np.ndarray, extras: dict, quality: int) -> bytes:
    import imagecodecs

    png = bytes(imagecodecs.png_encode(pixels))
    kept = b"".join(_png_chunk(kind, contents) for kind, contents in extras.get("png_chunks", ()))
    return png[:PNG_IHDR_END] + kept + png[PNG_IHDR_END:]


@contextmanager
def _quiet_logger(name: str):
    """Mute a library's warnings while it parses a file: a broken file must give one error line, not a log too."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _open_tiff(data: bytes, source: str):
    """The TiffFile, its tags parsed and no pixels decoded; any failure of tifffile's as one InputError."""
    import tifffile

    try:
        with _quiet_logger("tifffile"), tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise InputError(f"{source}: the TIFF holds no image")
            yield tif
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{source}: cannot decode the TIFF ({type(e).__name__}: {e})") from None


def _tiff_pixels(data: bytes, source: str) -> int:
    """Pixels of the first page (its depth counted, for volumes), from its tags."""
    with _open_tiff(data, source) as tif:
        page = tif.pages[0]
        if page.samplesperpixel not in CHANNEL_LAYOUTS:
            raise InputError(f"{source}: the TIFF has {page.samplesperpixel} samples per pixel; expected 1 (gray), "
                             "2 (gray + alpha), 3 (RGB) or 4 (RGBA)")
        sizes = (page.imagelength, page.imagewidth, page.imagedepth)
        if not all(isinstance(size, int) for size in sizes):  # a size tag holding several values
            raise InputError(f"{source}: cannot decode the TIFF (malformed image size tags {sizes})")
        return math.prod(sizes)


def _has_second_page(tif) -> bool:
    """Whether the first page links to another: read up to that link only. Counting pages, or grouping them into
    series, walks every page, which in a corrupt file can mean a near-endless chain."""
    try:
        tif.pages[1]
    except IndexError:
        return False
    return True


def _decode_tiff(data: bytes, source: str) -> tuple[np.ndarray, dict]:
    with _open_tiff(data, source) as tif:
        if _has_second_page(tif):
            raise InputError(f"{source}: multi-page TIFFs are not supported; save each page as its own file")
        if not tif.series:
            raise InputError(f"{source}: the TIFF holds no image")
        series, page = tif.series[0], tif.pages[0]
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if photometric not in ("MINISBLACK", "RGB"):
            raise InputError(f"{source}: TIFF photometric {photometric} is not supported (use grayscale or RGB)")
        pixels, axes = series.asarray(), series.axes
        extras = {"iccprofile": page.iccprofile, "extrasamples": page.extrasamples}
        if 274 in page.tags:  # Orientation: how viewers turn the stored pixels
            extras["orientation"] = page.tags[274].value
    if axes == "SYX":  # planar configuration: one plane per sample
        pixels = np.moveaxis(pixels, 0, -1)
    elif axes not in ("YX", "YXS"):
        raise InputError(f"{source}: TIFF axes {axes} are not one 2-D image")
    return pixels, extras


def _encode_tiff(pixels: np.ndarray, extras: dict, quality: int) -> bytes:
    import tifffile

    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    alpha_kind = (extras.get("extrasamples") or ["unassalpha"]) if channels in (2, 4) else None  # premultiplied or not
    orientation = extras.get("orientation")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="minisblack" if channels <= 2 else "rgb", extrasamples=alpha_kind,
                     iccprofile=extras.get("iccprofile"), compression="zlib",
                     extratags=[(274, "H", 1, orientation, True)] if orientation else None)
    return buffer.getvalue()


PILLOW_MODES = {"L": None, "LA": None, "RGB": None, "RGBA": None, "1": "L", "P": "RGB", "PA": "RGBA"}


@contextmanager
def _open_pillow(data: bytes, source: str):
    """The image opened lazily (header read, no pixels decoded); Pillow's failures as one InputError.

    Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) warns, then raises at twice the size, while
    opening: both become the error line. It only ever tightens ``DecodeLimits`` for JPEG and WebP."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                yield im
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{source}: refused by Pillow's decompression-bomb check ({e}); JPEG and WebP images are "
                         f"limited to {Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise InputError(f"{source}: corrupt or truncated {sniff_format(data).upper()} file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{source}: cannot decode the {sniff_format(data).upper()} ({e})") from None


def _pillow_pixels(data: bytes, source: str) -> int:
    with _open_pillow(data, source) as im:
        return im.width * im.height


def _decode_pillow(data: bytes, source: str) -> tuple[np.ndarray, dict]:
    with _open_pillow(data, source) as im:
        if im.format == "MPO":  # a JPEG photo with images appended after it, open at the photo (frame 0)
            log.warning("%s: keeping the main image and dropping the %d extra image(s) stored with it (a gain "
                        "map or depth map); the output is a plain JPEG", source, im.n_frames - 1)
        elif getattr(im, "n_frames", 1) > 1:
            raise InputError(f"{source}: animated images are not supported")
        if im.mode not in PILLOW_MODES:
            raise InputError(f"{source}: image mode {im.mode} is not supported (use grayscale, RGB or RGBA)")
        target = PILLOW_MODES[im.mode]
        if im.mode == "P" and "transparency" in im.info:
            target = "RGBA"
        extras = {k: im.info[k] for k in ("icc_profile", "exif") if im.info.get(k)}
        if im.format == "WEBP":
            extras["lossless"] = _webp_is_lossless(data)
        pixels = np.asarray(im.convert(target) if target else im)
    return pixels, extras


def _webp_is_lossless(data: bytes) -> bool:
    """True when the WebP's image chunk is VP8L (lossless): the output is then written lossless too."""
    offset = 12
    while offset + 8 <= len(data):
        fourcc, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        offset += 8 + size + (size & 1)  # chunks are padded to even sizes
    return False


def _pillow_encoder(pillow_format: str) -> Callable[[np.ndarray, dict, int], bytes]:
    def encode(pixels: np.ndarray, extras: dict, quality: int) -> bytes:
        from PIL import Image

        options = {k: v for k, v in extras.items() if k in ("icc_profile", "exif")}
        if pillow_format == "WEBP" and extras.get("lossless"):
            options.update(lossless=True, exact=True)  # exact: keep the colour under transparent pixels as well
        buffer = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).save(
            buffer, pillow_format, quality=quality, **options)
        return buffer.getvalue()

    return encode


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # where the array's bytes start


def _npy_header(data: bytes, source: str) -> NpyHeader:
    """The .npy header, read with NumPy's own parser; InputError unless the bytes after it hold the whole array.

    ``np.load`` allocates the array the header declares before reading it from a stream, so a 100-byte file could
    ask for terabytes: the declared size is compared with the bytes actually present first."""
    from numpy.lib import format as npy_format

    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"version {version[0]}.{version[1]} is not supported (save with numpy.save)")
        shape, fortran_order, dtype = read_header(stream)
    except Exception as e:  # a bad magic string, version or header: ValueError, or tokenize's errors on a garbled one
        raise InputError(f"{source}: cannot read the .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise InputError(f"{source}: the .npy array holds Python objects, not pixels")
    header = NpyHeader(tuple(shape), fortran_order, dtype, stream.tell())
    declared = math.prod(header.shape) * dtype.itemsize
    if len(data) - header.offset < declared:
        raise InputError(f"{source}: the .npy file is truncated: its header declares {declared:,} bytes of "
                         f"{dtype} {header.shape}, and {len(data) - header.offset:,} follow")
    return header


def _npy_pixels(data: bytes, source: str) -> int:
    shape = _npy_header(data, source).shape
    return math.prod(shape[:2])  # height x width; the channel axis, or any other, is checked on decoding


def _decode_npy(data: bytes, source: str) -> tuple[np.ndarray, dict]:
    header = _npy_header(data, source)
    try:  # a view of the bytes already read: no second copy
        array = np.frombuffer(data, header.dtype, math.prod(header.shape), header.offset)
    except ValueError as e:  # zero-size or otherwise unusable dtypes
        raise InputError(f"{source}: cannot read the .npy array ({e})") from None
    return array.reshape(header.shape, order="F" if header.fortran_order else "C"), {}


def _encode_npy(pixels: np.ndarray, extras: dict, quality: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, pixels, allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class Codec:
    pixels: Callable[[bytes, str], int]  # the pixel count its header declares, without decoding
    decode: Callable[[bytes, str], tuple[np.ndarray, dict]]
    encode: Callable[[np.ndarray, dict, int], bytes]  # (pixels, extras, quality) -> bytes


CODECS = {
    "png": Codec(_png_pixels, _decode_png, _encode_png),
    "jpeg": Codec(_pillow_pixels, _decode_pillow, _pillow_encoder("JPEG")),
    "tiff": Codec(_tiff_pixels, _decode_tiff, _encode_tiff),
    "webp": Codec(_pillow_pixels, _decode_pillow, _pillow_encoder("WEBP")),
    "npy": Codec(_npy_pixels, _decode_npy, _encode_npy),
}


# --- public entry points ---------------------------------------------------------------------------------------------

def image_pixels(data: bytes, source: str = "image", limits: DecodeLimits = DecodeLimits()) -> int:
    """The pixel count an image file's header declares, decoding nothing; InputError when the file is not an
    image or is over ``limits``."""
    limits.check_file_bytes(len(data), source)
    fmt = sniff_format(data)
    if fmt is None:
        raise InputError(f"{source}: not a PNG, JPEG, TIFF, WebP or .npy image")
    pixels = CODECS[fmt].pixels(data, source)
    limits.check_pixels(pixels, source)
    return pixels


def decode_image(data: bytes, source: str = "image", limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Any supported file's bytes -> the model's RGB and the layout to write it back; InputError when unusable or
    over ``limits`` (checked from the header, before decoding)."""
    image_pixels(data, source, limits)
    fmt = sniff_format(data)
    pixels, extras = CODECS[fmt].decode(data, source)
    return split_channels(np.asarray(pixels), fmt, source, extras)


def encode_image(rgb: np.ndarray, like: DecodedImage, quality: int = DEFAULT_QUALITY) -> bytes:
    """Denoised float RGB (H, W, 3) -> file bytes in ``like``'s format, bit depth, channels and alpha."""
    layout = like.layout
    return CODECS[layout.format].encode(merge_channels(rgb, layout, like.alpha), layout.extras, quality)


def read_image(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """``decode_image`` of a file, whose size is checked before it is read."""
    path = Path(path)
    try:
        limits.check_file_bytes(path.stat().st_size, str(path))
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, str(path), limits)


def write_image(path: str | Path, rgb: np.ndarray, like: DecodedImage, quality: int = DEFAULT_QUALITY) -> None:
    """Write atomically: a reader never sees half an image, and a failed write leaves no partial file."""
    data = encode_image(rgb, like, quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
