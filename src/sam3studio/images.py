"""Decode any image a user may hand us into an upright RGB uint8 array, or say why not.

Limits are checked from the header before pixels are decoded, so a decompression bomb costs
nothing. EXIF rotation is applied so that masks line up with what the user sees.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB of RGB: enough for any camera
Image.init()  # register every plugin now, so the allow-list below can be checked against them
# Never EPS/PS (decoded by Ghostscript) or other exotic decoders; formats this Pillow lacks are left out.
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO") if f in Image.OPEN)

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


class ImageTooLarge(ImageError):
    """More pixels than the limit allows (a decompression bomb, or just a huge image)."""


class UnsupportedImage(ImageError):
    """Not an image, or a format that is not decoded."""


def load_image(source: ImageInput, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array, EXIF-upright.

    `source` is a path, encoded bytes, a PIL image or an array ((H, W), (H, W, 3) or (H, W, 4),
    uint8 or uint16). `name` is used in error messages for bytes input.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name or "array", max_pixels)
    if isinstance(source, Image.Image):
        return _decode_translating_errors(lambda: _decoded_to_rgb(source, name or "image", max_pixels), name or "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_and_decode(io.BytesIO(bytes(source)), name or "uploaded image", max_pixels)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path}: no such file.")
    with open(path, "rb") as f:
        return _open_and_decode(f, str(path), max_pixels)


def _open_and_decode(stream: io.IOBase, name: str, max_pixels: int) -> np.ndarray:
    def decode() -> np.ndarray:
        image = Image.open(stream, formats=ALLOWED_FORMATS)
        _check_pixels(image.size, name, max_pixels)  # from the header, before any pixel is decoded
        image.load()
        return _decoded_to_rgb(image, name, max_pixels)

    return _decode_translating_errors(decode, name)


def _decode_translating_errors(decode: Callable[[], np.ndarray], name: str) -> np.ndarray:
    """Run `decode`, turning Pillow's many failure types into one ImageError naming the image."""
    try:
        return decode()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: too many pixels to decode safely ({exc}).") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"{name}: not an image, or a format other than {', '.join(ALLOWED_FORMATS)}.") from None
    except ImageError:
        raise
    except MemoryError:
        raise ImageTooLarge(f"{name}: not enough memory to decode it.") from None
    except Exception as exc:  # noqa: BLE001 - crafted files reach Pillow's TypeError, IndexError, struct.error...
        raise ImageError(f"{name}: the file is damaged or truncated and cannot be decoded ({type(exc).__name__}: {exc}).") from None


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is empty ({width}x{height}).")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} MP, over the limit of "
            f"{max_pixels / 1e6:.0f} MP. Downscale it first."
        )


def _decoded_to_rgb(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    _check_pixels(image.size, name, max_pixels)
    image = ImageOps.exif_transpose(image)  # an animated file opens at its first frame
    return _array_to_rgb(_to_rgb_compatible(image), name, max_pixels)


def _to_rgb_compatible(image: Image.Image) -> np.ndarray | Image.Image:
    """Bring every mode to something `_array_to_rgb` takes, without clipping 16-bit data."""
    if image.mode.startswith("I;16"):  # 16-bit, either byte order: scaled by 65535, so a dark image stays dark
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":  # 32-bit integers, whose range is the data's: 8-bit values (0-255) are common in TIFFs
        return np.asarray(image)
    if image.mode == "F":
        return np.asarray(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):  # a colour marked transparent (PNG tRNS)
        image = image.convert("RGBA")
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    return np.asarray(image)


def _array_to_rgb(array: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}.")
    _check_pixels((array.shape[1], array.shape[0]), name, max_pixels)
    array = _to_uint8(array, name)
    if array.ndim == 2 or array.shape[2] == 1:
        array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    elif array.shape[2] == 4:
        array = _flatten_alpha(array)
    # Arrays viewed from PIL images are read-only; torch warns on those and callers may edit.
    return np.array(array, copy=not array.flags.writeable or not array.flags.c_contiguous, order="C")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # Scale by the type's range, not the data's, so that a dark 16-bit image stays dark.
        top = 65535 if array.dtype == np.uint16 or array.max(initial=0) > 255 else 255
        return (np.clip(array, 0, top).astype(np.float32) * (255.0 / top) + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: the image holds NaN or infinite values.")
        top = _float_range(float(array.max(initial=0)))
        return (np.clip(array, 0, top) * (255.0 / top) + 0.5).astype(np.uint8)
    raise ImageError(f"{name}: pixel type {array.dtype} is not supported.")


def _float_range(peak: float) -> float:
    """The full-scale value float pixels were most likely stored against."""
    for top in (1.0, 255.0, 65535.0):
        if peak <= top * 1.001:
            return top
    return peak


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite over white, the way most viewers show a transparent image."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return (rgb + 0.5).astype(np.uint8)
