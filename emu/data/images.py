"""Safe inspection of encoded image bytes: format, size, and whether they decode, without trusting them.

Web-scale data holds zero-byte files, HTML saved as .jpg, truncated downloads and decompression
bombs (tiny files that declare gigapixel canvases). Each is reported with its own rule name so the
rejects file and the validation report say exactly what was wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

#: Default pixel budget. Above it an image is refused as a decompression bomb before any pixel is
#: decoded. 8192*8192 is far above any Emu2 training resolution (448 px encoder, 1024 px decoder).
DEFAULT_MAX_PIXELS = 8192 * 8192

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # file extension used for the shard member: png, jpg, webp, gif, bmp
    width: int
    height: int


class ImageProblem(Exception):
    """An image that cannot be used. `rule` is the stable rule name reported to users."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule
        self.message = message


def sniff_format(data: bytes) -> str | None:
    """The image format from magic bytes, or None when the bytes are no known image format."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> ImageInfo:
    """Return format and size of encoded image bytes, or raise ImageProblem naming the rule broken.

    The declared size is checked against `max_pixels` before decoding, so a bomb costs nothing.
    With `decode`, every pixel is decoded so truncated files are caught too.
    """
    if len(data) == 0:
        raise ImageProblem("image_empty", "image is zero bytes")
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:16]
        raise ImageProblem("image_not_image", f"bytes are not a PNG/JPEG/WebP/GIF/BMP image (start {head!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ImageProblem("image_size_invalid", f"declared size {width}x{height}")
                if width * height > max_pixels:
                    raise ImageProblem(
                        "image_decompression_bomb",
                        f"declared size {width}x{height} = {width * height} pixels exceeds the limit "
                        f"of {max_pixels} pixels")
                if decode:
                    img.load()
        except ImageProblem:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageProblem("image_decompression_bomb", str(exc)) from None
        except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError...)
            raise ImageProblem("image_undecodable", f"{type(exc).__name__}: {exc}") from None
    return ImageInfo(format=fmt, width=width, height=height)
