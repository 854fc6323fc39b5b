"""Image files in and out (every format, bit depth and channel layout), tiling, and the ``denoise`` command."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from denoise_fixtures import decode_with_reference, encode_with_reference, noisy_photo, quantize, write_tiny_checkpoint
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.data.image_io import decode_image, read_image, sniff_format, write_image
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.denoising.tiling import TileOptions, blend_window, denoise_tiled, tile_boxes
from ddim_denoise.pipeline.errors import InputError

RNG = np.random.default_rng(0)
H, W = 21, 27  # odd: not a multiple of the U-Net's downsampling factor
PHOTO = np.clip(noisy_photo(H, W, sigma=0.05), 0, 1)  # a real picture: JPEG's losses stay small on it
GRAY, ALPHA = PHOTO.mean(axis=2), RNG.random((H, W))

# name -> (format, stored pixels, lossless?)
KINDS = {
    "png8_rgb": ("png", quantize(PHOTO, np.uint8), True),
    "png16_rgb": ("png", quantize(PHOTO, np.uint16), True),
    "png16_gray": ("png", quantize(GRAY, np.uint16), True),
    "png8_rgba": ("png", quantize(np.dstack([PHOTO, ALPHA]), np.uint8), True),
    "png8_gray_alpha": ("png", quantize(np.dstack([GRAY, ALPHA]), np.uint8), True),
    "jpeg_rgb": ("jpeg", quantize(PHOTO, np.uint8), False),
    "jpeg_gray": ("jpeg", quantize(GRAY, np.uint8), False),
    "tiff16_rgb": ("tiff", quantize(PHOTO, np.uint16), True),
    "tiff8_gray": ("tiff", quantize(GRAY, np.uint8), True),
    "tiff_float32": ("tiff", PHOTO.astype(np.float32), True),
    "webp_rgb": ("webp", quantize(PHOTO, np.uint8), True),
    "webp_rgba": ("webp", quantize(np.dstack([PHOTO, ALPHA]), np.uint8), True),
    "npy_float32_rgb": ("npy", PHOTO.astype(np.float32), True),
    "npy_uint16_gray": ("npy", quantize(GRAY, np.uint16), True),
    "npy_uint8_gray_axis": ("npy", quantize(GRAY[..., None], np.uint8), True),
}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "webp": ".webp", "npy": ".npy"}


def write_kind(folder, name):
    fmt, pixels, _ = KINDS[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{SUFFIX[fmt]}"
    path.write_bytes(encode_with_reference(fmt, pixels))
    return path


@pytest.fixture
def checkpoint(tmp_path, tiny_params):
    return write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- image_io ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_reads_as_rgb_and_writes_back_in_its_own_form(tmp_path, name):
    fmt, pixels, lossless = KINDS[name]
    image = read_image(write_kind(tmp_path, name))
    assert image.rgb.shape == (H, W, 3) and image.rgb.dtype == np.float32
    assert image.layout.format == fmt and image.layout.dtype == pixels.dtype and image.layout.shape == pixels.shape
    if image.layout.gray:  # replicated for the model
        assert np.array_equal(image.rgb[..., 0], image.rgb[..., 2])

    write_image(tmp_path / "out" / f"copy{SUFFIX[fmt]}", image.rgb, image)
    stored = decode_with_reference(tmp_path / "out" / f"copy{SUFFIX[fmt]}")
    assert sniff_format((tmp_path / "out" / f"copy{SUFFIX[fmt]}").read_bytes()) == fmt
    assert stored.dtype == pixels.dtype and stored.shape == pixels.shape
    if lossless:
        np.testing.assert_allclose(stored, pixels, atol=1e-6)  # floats: a round trip through float32 only
    else:  # re-encoded at quality 95: close to what was decoded
        decoded = image.rgb if not image.layout.gray else image.rgb[..., :1]
        assert np.abs(stored.reshape(decoded.shape[:2] + (-1,)) / 255 - decoded).mean() < 0.01


def test_alpha_is_reattached_untouched_while_colour_changes(tmp_path):
    image = read_image(write_kind(tmp_path, "png8_rgba"))
    write_image(tmp_path / "out.png", 1 - image.rgb, image)
    stored = decode_with_reference(tmp_path / "out.png")
    assert np.array_equal(stored[..., 3], KINDS["png8_rgba"][1][..., 3])
    assert not np.array_equal(stored[..., :3], KINDS["png8_rgba"][1][..., :3])


def test_gray_output_is_the_channel_mean(tmp_path):
    image = read_image(write_kind(tmp_path, "png16_gray"))
    rgb = np.stack([image.rgb[..., 0] * 0.5, image.rgb[..., 0], image.rgb[..., 0] * 0.9], axis=-1)
    write_image(tmp_path / "g.png", rgb, image)
    np.testing.assert_array_equal(decode_with_reference(tmp_path / "g.png"), quantize(rgb.mean(-1), np.uint16))


@pytest.mark.parametrize("data, message", [
    (b"hello, I am text", "not a PNG, JPEG, TIFF, WebP or .npy image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "cannot decode the PNG"),
    (b"\xff\xd8\xff\xe0 truncated", "JPEG"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
    (b"II*\x00\xff\xff\xff\x7f", "TIFF"),
])
def test_not_an_image_is_one_input_error(data, message):
    with pytest.raises(InputError, match=message):
        decode_image(data, source="f")


def test_unsupported_arrays_and_modes_are_refused(tmp_path):
    import io

    from PIL import Image

    for array, message in [(np.zeros((4, 5, 6), np.uint8), "C = 1"),
                           (np.zeros((2, 4, 5, 3), np.uint8), "not one image"),
                           (np.zeros((4, 5), np.int32), "pixel type int32"), (np.full((4, 5), np.nan), "NaN")]:
        with pytest.raises(InputError, match=message):
            decode_image(encode_with_reference("npy", array))
    buffer = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(buffer, "JPEG")
    with pytest.raises(InputError, match="mode CMYK"):
        decode_image(buffer.getvalue())


def test_an_mpo_jpeg_is_read_as_its_main_image_and_written_as_a_plain_jpeg(tmp_path, caplog):
    """Ultra HDR phone photos (a gain map) and depth photos are JPEGs with images appended (MPF): Pillow opens them
    as two-frame MPO, which was refused as animated. Animated WebP and PNG (APNG) stay refused."""
    import io

    from PIL import Image

    main, gain_map = quantize(PHOTO, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    path = tmp_path / "ultra_hdr.jpg"
    Image.fromarray(main).save(path, "MPO", quality=95, save_all=True, append_images=[Image.fromarray(gain_map)])
    with caplog.at_level("WARNING"):
        image = read_image(path)
    assert "dropping the 1 extra image" in caplog.text
    assert image.layout.format == "jpeg" and image.layout.shape == main.shape
    assert np.abs(image.rgb - main / 255).mean() < 0.05  # the main image, up to JPEG's losses on noise
    write_image(tmp_path / "out.jpg", image.rgb, image)
    with Image.open(tmp_path / "out.jpg") as written:
        assert written.format == "JPEG" and getattr(written, "n_frames", 1) == 1
    frames = [Image.fromarray(main), Image.fromarray(255 - main)]
    for fmt in ("WEBP", "PNG"):
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(InputError, match="animated images are not supported"):
            decode_image(buffer.getvalue(), source=f"animated.{fmt.lower()}")


@pytest.mark.parametrize("fmt", ["npy", "tiff"])
def test_floats_on_another_scale_than_0_1_are_refused(fmt):
    """A float image on the 0-255 scale was taken as nearly all white (sigma estimated at 1.0)."""
    with pytest.raises(InputError, match=r"floats must be on the \[0, 1\] scale: divide by 255"):
        decode_image(encode_with_reference(fmt, (PHOTO * 255).astype(np.float32)), source=f"f.{fmt}")
    noisy = noisy_photo(H, W, sigma=0.2).astype(np.float32)  # noise strays a little outside [0, 1]: still fine
    assert noisy.min() < 0 < 1 < noisy.max()
    np.testing.assert_array_equal(decode_image(encode_with_reference(fmt, noisy)).rgb, noisy)


def test_a_big_endian_npy_reads_as_its_values():
    pixels = quantize(PHOTO, np.uint16)
    image = decode_image(encode_with_reference("npy", pixels.astype(">u2")), source="big_endian.npy")
    assert image.layout.dtype == np.uint16
    np.testing.assert_array_equal(image.rgb, decode_image(encode_with_reference("npy", pixels)).rgb)


@functools.cache  # one profile: it holds its creation time, so two made a second apart differ
def srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("pixels", [quantize(np.dstack([PHOTO, ALPHA]), np.uint8), quantize(GRAY, np.uint16)],
                         ids=["rgba8", "gray16"])
def test_png_keeps_the_icc_profile_and_the_orientation(tmp_path, pixels):
    """PNG outputs lost the input's iCCP (colour profile) and eXIf (orientation: a phone photo turned sideways)."""
    from PIL import Image

    exif = Image.Exif()
    exif[274] = 6  # Orientation: rotate 90 degrees to view
    Image.fromarray(pixels).save(tmp_path / "in.png", icc_profile=srgb_profile(), exif=exif.tobytes())
    image = read_image(tmp_path / "in.png")
    write_image(tmp_path / "out.png", image.rgb, image)
    with Image.open(tmp_path / "out.png") as written:
        assert written.info["icc_profile"] == srgb_profile() and written.getexif()[274] == 6
    np.testing.assert_array_equal(decode_with_reference(tmp_path / "out.png"), pixels)  # bit-exact, 16-bit too


@pytest.mark.parametrize("alpha_kind", ["assocalpha", "unassalpha"])
def test_tiff_keeps_the_icc_profile_the_orientation_and_the_kind_of_alpha(tmp_path, alpha_kind):
    """Premultiplied (associated) alpha was written back labelled unassociated, and the profile and orientation
    were dropped."""
    import tifffile

    pixels = quantize(np.dstack([PHOTO, ALPHA]), np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", pixels, photometric="rgb", extrasamples=[alpha_kind],
                     iccprofile=srgb_profile(), extratags=[(274, "H", 1, 8, True)])
    image = read_image(tmp_path / "in.tif")
    write_image(tmp_path / "out.tif", image.rgb, image)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert page.iccprofile == srgb_profile() and page.tags[274].value == 8
        assert [sample.name.lower() for sample in page.extrasamples] == [alpha_kind]
        np.testing.assert_array_equal(page.asarray(), pixels)


# --- tiling --------------------------------------------------------------------------------------------------------

def identity(tiles, sigma):
    return tiles.copy()


def box_blur(tiles, sigma):
    """A denoiser whose output is local: each pixel from its 3x3 neighbourhood (edges replicated)."""
    padded = np.pad(tiles, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = tiles.shape[1:3]
    return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


OPTIONS = TileOptions(tile=32, overlap=8, batch=5)


def test_tiles_cover_the_image_and_batches_bound_memory():
    image = noisy_photo(75, 101)
    boxes = tile_boxes(75, 101, OPTIONS)
    covered = np.zeros((75, 101), int)
    for top, left, th, tw in boxes:
        covered[top:top + th, left:left + tw] += 1
    assert covered.min() >= 1 and len(boxes) > OPTIONS.batch
    seen, done = [], []
    denoise_tiled(lambda t, s: seen.append(len(t)) or identity(t, s), image, 0.1, OPTIONS, on_tiles=done.append)
    assert max(seen) <= OPTIONS.batch and sum(done) == len(boxes)


def test_blend_has_no_seams_an_identity_denoiser_returns_the_input_exactly():
    image = noisy_photo(75, 101)
    np.testing.assert_allclose(denoise_tiled(identity, image, 0.1, OPTIONS), image, atol=1e-6, rtol=0)
    assert blend_window(32, 32, 8).min() > 0  # border pixels covered by one tile keep a weight


def test_tiled_equals_whole_for_a_local_denoiser():
    image = noisy_photo(75, 101)
    whole = box_blur(image[None], None)[0]
    tiled = denoise_tiled(box_blur, image, 0.1, OPTIONS)
    pointwise = lambda t, s: t ** 2  # noqa: E731 - output depends on each pixel alone: tiling is exact
    np.testing.assert_allclose(denoise_tiled(pointwise, image, 0.1, OPTIONS), image ** 2, atol=1e-6)
    assert np.abs(tiled - whole).mean() < 1e-4 and np.abs(tiled - whole).max() < 5e-3  # only tile borders differ


def test_small_images_go_whole_and_bad_tile_options_are_refused():
    calls = []
    denoise_tiled(lambda t, s: calls.append(t.shape) or t, noisy_photo(20, 32), 0.1, OPTIONS)
    assert calls == [(1, 20, 32, 3)]
    for bad in (TileOptions(tile=16, overlap=16), TileOptions(tile=0), TileOptions(batch=0)):
        with pytest.raises(InputError):
            bad.validate()


def test_tiled_denoising_with_the_model_stays_close_to_whole(checkpoint):
    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu")
    image = noisy_photo(48, 56)
    whole = denoiser.denoise(image[None], 0.1)[0]
    tiled = denoise_tiled(denoiser.denoise, image, 0.1, TileOptions(tile=32, overlap=12, batch=4))
    # GroupNorm and attention see the whole tile, so a real U-Net is not exactly local: close, not equal
    assert np.abs(tiled - whole).mean() < 0.5 * np.abs(whole - np.clip(image, 0, 1)).mean()


# --- the denoise command -------------------------------------------------------------------------------------------

def test_denoise_command_handles_every_kind_and_keeps_its_form(tmp_path, checkpoint):
    inputs = [write_kind(tmp_path / "in", name) for name in sorted(KINDS)]
    big = tmp_path / "in" / "big_photo.png"  # several tiles
    big.write_bytes(encode_with_reference("png", quantize(np.clip(noisy_photo(70, 90), 0, 1), np.uint8)))
    result = CliRunner().invoke(app, ["denoise", *map(str, inputs + [big]), "--out", str(tmp_path / "out"),
                                      "--sigma", "0.1", "--tile", "32", "--overlap", "8", "--checkpoint",
                                      str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, result.output
    for source in inputs:
        fmt, pixels, _ = KINDS[source.stem]
        stored = decode_with_reference(tmp_path / "out" / source.name)
        assert sniff_format((tmp_path / "out" / source.name).read_bytes()) == fmt
        assert stored.dtype == pixels.dtype and stored.shape == pixels.shape, source.name
        if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
            assert np.array_equal(stored[..., -1], pixels[..., -1]), f"{source.name}: alpha changed"
    assert decode_with_reference(tmp_path / "out" / big.name).shape == (70, 90, 3)

    # the written pixels are the model's output, quantised to the input's bit depth
    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu")
    expected = denoiser.denoise(read_image(inputs[0].parent / "png16_rgb.png").rgb[None], 0.1)[0]
    np.testing.assert_array_equal(decode_with_reference(tmp_path / "out" / "png16_rgb.png"),
                                  quantize(expected, np.uint16))


def test_transparent_pixels_stored_as_0_neither_mislead_the_estimate_nor_change(tmp_path, checkpoint):
    """A cut-out: the left half fully transparent and stored as 0, which looked like noise clipped to 0 and drew the
    estimate of the visible half's 0.1 down to 0.04 (docs/serving.md, *The command line*)."""
    photo = np.clip(noisy_photo(64, 64, sigma=0.1, seed=2), 0, 1)
    rgba = np.dstack([quantize(photo, np.uint8), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32] = 0
    cutout, opaque = tmp_path / "cutout.png", tmp_path / "opaque.png"
    cutout.write_bytes(encode_with_reference("png", rgba))
    opaque.write_bytes(encode_with_reference("png", rgba[:, 32:]))
    result = CliRunner().invoke(app, ["denoise", str(cutout), str(opaque), "-o", str(tmp_path / "out"), "--estimate",
                                      "-c", str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, result.output
    estimates = {line.split(":")[0].rsplit("/", 1)[-1]: float(line.split("estimated sigma ")[1].split()[0])
                 for line in result.output.splitlines() if "estimated sigma" in line}
    assert estimates["cutout.png"] == pytest.approx(estimates["opaque.png"], rel=0.05)
    assert estimates["opaque.png"] == pytest.approx(0.1, rel=0.15)
    np.testing.assert_array_equal(decode_with_reference(tmp_path / "out" / "cutout.png")[:, :32], rgba[:, :32])


def test_the_ddim_stop_sigma_reaches_the_walk_at_model_scale(tmp_path, checkpoint, monkeypatch):
    import ddim_denoise.denoising.denoiser as denoiser_module

    stops = []
    monkeypatch.setattr(denoiser_module, "denoise_ddim",
                        lambda model, schedule, y, sigma, steps, eta, generator, stop_sigma: stops.append(stop_sigma) or y)
    path = write_kind(tmp_path, "png8_rgb")
    result = CliRunner().invoke(app, ["denoise", str(path), "-o", str(tmp_path / "out"), "--sigma", "0.1", "--steps",
                                      "5", "--ddim-stop-sigma", "0.05", "-c", str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert stops and stops == [pytest.approx(0.1)] * len(stops)  # pixel 0.05 is model-scale 0.1
    bad = CliRunner().invoke(app, ["denoise", str(path), "-o", str(tmp_path / "out2"), "--sigma", "0.1",
                                   "--ddim-stop-sigma", "-1", "-c", str(checkpoint)])
    assert "DDIM stop sigma" in one_line_error(bad)


def test_estimate_prints_a_sigma_near_the_true_one(tmp_path, checkpoint):
    path = tmp_path / "photo.tif"
    path.write_bytes(encode_with_reference("tiff", quantize(np.clip(noisy_photo(64, 64, sigma=0.1), 0, 1),
                                                            np.uint16)))
    result = CliRunner().invoke(app, ["denoise", str(path), "-o", str(tmp_path / "out"), "--estimate",
                                      "-c", str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "estimated sigma" in line)
    assert abs(float(line.split("estimated sigma ")[1].split()[0]) - 0.1) < 0.03
    assert (tmp_path / "out" / "photo.tif").is_file()


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_image_is_denoised(tmp_path, checkpoint, monkeypatch):
    """``-o a_file/sub`` denoised the first image, then failed with a NotADirectoryError traceback."""
    import ddim_denoise.serving.denoise_files as denoise_files_module

    monkeypatch.setattr(denoise_files_module, "denoise_decoded", lambda *args, **kwargs: pytest.fail("denoised"))
    inputs = [str(write_kind(tmp_path, name)) for name in ("png8_rgb", "jpeg_rgb")]
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(app, ["denoise", *inputs, "-o", str(tmp_path / "a_file" / "sub"), "--sigma", "0.1",
                                      "-c", str(checkpoint), "--no-progress"])
    assert "cannot create or write to this folder (Not a directory)" in one_line_error(result)


def test_existing_outputs_are_kept_unless_overwrite_is_given(tmp_path, checkpoint, monkeypatch):
    """``denoise`` replaced files already in --out unasked. It refuses, naming them, before the model loads;
    ``--overwrite`` replaces them; an output that is its own input is refused even then."""
    import ddim_denoise.serving.denoise_files as denoise_files_module

    inputs = [write_kind(tmp_path / "in", name) for name in ("png8_rgb", "jpeg_rgb")]
    out = tmp_path / "out"
    out.mkdir()
    (out / inputs[1].name).write_bytes(b"an earlier result")

    def denoise(out_dir, *extra):
        return CliRunner().invoke(app, ["denoise", *map(str, inputs), "-o", str(out_dir), "--sigma", "0.1",
                                        "-c", str(checkpoint), "--no-progress", *extra])

    load_denoiser = denoise_files_module.load_denoiser
    monkeypatch.setattr(denoise_files_module, "load_denoiser", lambda *a, **k: pytest.fail("the model was loaded"))
    assert f"{out / inputs[1].name}: already exists; pass --overwrite" in one_line_error(denoise(out))
    assert not (out / inputs[0].name).exists() and (out / inputs[1].name).read_bytes() == b"an earlier result"
    assert "would overwrite the input" in one_line_error(denoise(tmp_path / "in", "--overwrite"))

    monkeypatch.setattr(denoise_files_module, "load_denoiser", load_denoiser)
    result = denoise(out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sniff_format((out / inputs[1].name).read_bytes()) == "jpeg" and (out / inputs[0].name).is_file()


@pytest.mark.parametrize("sigma", ["nan", "0", "-0.1", "1.5", "inf", "abc"])
def test_bad_sigma_is_one_line_and_exit_2(tmp_path, checkpoint, sigma):
    path = write_kind(tmp_path, "png8_rgb")
    result = CliRunner().invoke(app, ["denoise", str(path), "-o", str(tmp_path / "out"), "--sigma", sigma,
                                      "-c", str(checkpoint)])
    assert "sigma" in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not_an_image", "missing_file", "no_sigma", "sigma_and_estimate", "two_sources",
                                  "bad_checkpoint", "same_names", "bad_tiles", "huge_steps"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, case):
    good = write_kind(tmp_path, "png8_rgb")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / good.name
    twin.write_bytes(good.read_bytes())
    args = {
        "not_an_image": [str(text), "--sigma", "0.1"],
        "missing_file": [str(tmp_path / "nope.png"), "--sigma", "0.1"],
        "no_sigma": [str(good)],
        "sigma_and_estimate": [str(good), "--sigma", "0.1", "--estimate"],
        "two_sources": [str(good), "--sigma", "0.1", "--run-id", "abc"],
        "bad_checkpoint": [str(good), "--sigma", "0.1", "-c", str(text)],
        "same_names": [str(good), str(twin), "--sigma", "0.1"],
        "bad_tiles": [str(good), "--sigma", "0.1", "--tile", "16", "--overlap", "16"],
        "huge_steps": [str(good), "--sigma", "0.1", "--steps", "10000000000"],  # allocated 40 GB of timesteps
    }[case]
    if "-c" not in args:
        args += ["-c", str(checkpoint)]
    result = CliRunner().invoke(app, ["denoise", *args, "-o", str(tmp_path / "out"), "--no-progress"])
    one_line_error(result)
