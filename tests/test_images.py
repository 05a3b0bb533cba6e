import io

import numpy as np
import pytest
from PIL import Image

from sam3studio.images import ImageError, load_image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_rgb_png_round_trips_exactly(scene):
    assert np.array_equal(load_image(encode(Image.fromarray(scene), "PNG")), scene)


def test_path_and_array_inputs(tmp_path, scene):
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    from_path = load_image(path)
    assert from_path.shape == (90, 130, 3) and from_path.dtype == np.uint8
    assert from_path.flags.writeable
    assert np.array_equal(load_image(scene), scene)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = load_image(encode(image, "JPEG", exif=exif))
    assert decoded.shape == (40, 20, 3)  # portrait, as a viewer shows it


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_odd_modes_become_rgb(mode):
    image = Image.new("RGB", (16, 12), (200, 100, 50)).convert(mode)
    decoded = load_image(encode(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert decoded.shape == (12, 16, 3) and decoded.dtype == np.uint8


def test_rgba_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except one pixel
    rgba[0, 0, 3] = 255
    decoded = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[1, 1]) == (255, 255, 255)


def test_palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.putpixel((1, 1), 1)
    decoded = load_image(encode(image, "PNG", transparency=0))
    assert tuple(decoded[1, 1]) == (0, 255, 0) and tuple(decoded[0, 0]) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    decoded = load_image(encode(Image.fromarray(values), "PNG"))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]
    assert load_image(values)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode, marked", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_colour_marked_transparent_is_composited_over_white(mode, marked):
    image = Image.new(mode, (8, 8), marked)
    image.putpixel((1, 1), 90 if mode == "L" else (90, 90, 90))
    decoded = load_image(encode(image, "PNG", transparency=marked))
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[1, 1]) == (90, 90, 90)


def test_16_bit_big_endian_and_32_bit_integer_tiffs():
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes())
    assert load_image(encode(big_endian, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    eight_bit_values = np.array([[0, 128, 255]], np.int32)  # int32 TIFFs often hold 8-bit data: not to be read as 16-bit
    assert load_image(encode(Image.fromarray(eight_bit_values), "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_a_crafted_tiff_is_an_image_error_not_a_crash():
    import struct

    data = bytearray(encode(Image.new("RGB", (8, 8)), "TIFF"))
    directory = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, directory)[0]):
        offset = directory + 2 + 12 * entry
        tag, _, count = struct.unpack_from("<HHI", data, offset)
        if tag == 273:  # StripOffsets written as a FLOAT: Pillow raises TypeError
            struct.pack_into("<HHIf", data, offset, tag, 11, count, 8.5)
    with pytest.raises(ImageError, match="damaged"):
        load_image(bytes(data))


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data)[5, 5, 0] > 200


def test_truncated_file_names_the_file(tmp_path, scene):
    path = tmp_path / "cut.jpg"
    path.write_bytes(encode(Image.fromarray(scene), "JPEG")[:300])
    with pytest.raises(ImageError, match="cut.jpg.*(damaged|truncated)"):
        load_image(path)


def test_non_image_and_missing_file(tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        load_image(bogus)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_decompression_bomb_is_refused_before_decoding():
    huge = encode(Image.new("L", (6000, 5000)), "PNG")  # 30 MP, compresses to a few KB
    with pytest.raises(ImageError, match="over the limit"):
        load_image(huge, name="bomb.png", max_pixels=10_000_000)


def test_eps_is_not_decoded():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", name="x.eps")


def test_bad_arrays():
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, dtype=np.float32))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))


def test_lazily_opened_broken_pil_image(tmp_path, scene):
    path = tmp_path / "cut.png"
    path.write_bytes(encode(Image.fromarray(scene), "PNG")[:200])
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(Image.open(path), name="cut.png")


def test_float_tiff_with_16_bit_values():
    values = np.array([[0.0, 32767.5, 65535.0]], dtype=np.float32)
    decoded = load_image(encode(Image.fromarray(values, "F"), "TIFF"))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]
