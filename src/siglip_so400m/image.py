"""Image preprocessing: RGB, bicubic squash to the model's size, x/255, then (x - 0.5) / 0.5.

Bit for bit what transformers' `SiglipImageProcessorPil` computes: the same PIL resize on the
uint8 image, the rescale in float64 then a cast to float32, and the normalisation in float32.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = Image.Image | str | os.PathLike | np.ndarray

# The one list of formats every entry point decodes (the server, embed, zero-shot, fine-tuning data):
# common photo formats with mature decoders. Pillow would open some 40 others, and one of them, EPS,
# runs Ghostscript on the file, so Image.open gets this list (`formats=`) and never tries the rest.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Accepted too where Pillow can decode them: AVIF (Pillow's own plugin, built with libavif) and
# HEIF (pillow-heif, once its opener is registered).
OPTIONAL_FORMATS = ("AVIF", "HEIF")

# What counts as an image file when a folder is given (CLI, embed, training data): the suffixes
# of the formats above.
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .png .webp .gif .bmp .tif .tiff .avif .heic .heif".split())

# Keys of preprocessor_config.json that would ask for processing SigLIP never does.
_UNSUPPORTED_FLAGS = ("do_center_crop", "do_pad")


class ImageReadError(ValueError):
    """An image file that is missing, unreadable, truncated, too large or not an image."""


class ImageFormatError(ImageReadError):
    """An image in a format outside IMAGE_FORMATS (PCX, EPS, ...): refused before any decoding."""

    def __init__(self, message: str, format: str | None):
        super().__init__(message)
        self.format = format


def allowed_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS, plus those of OPTIONAL_FORMATS whose decoder is installed."""
    from PIL import features

    Image.init()  # registers Pillow's own plugins, AVIF among them
    extra = [f for f in OPTIONAL_FORMATS if f in Image.OPEN and (f != "AVIF" or features.check("avif"))]
    return IMAGE_FORMATS + tuple(extra)


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature the first bytes match, or None. Only the plugins'
    signature checks run (a comparison of bytes), never a decoder, so naming an EPS costs nothing."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a signature check given too few bytes
            continue
    return None


def open_image(fp: str | os.PathLike | io.BytesIO, name: str | None = None) -> Image.Image:
    """Image.open restricted to allowed_formats(): the lazily opened image (header read, no pixel
    decoded). A file in another format raises ImageFormatError naming that format; `name` names the
    image in errors (default: the path)."""
    formats = allowed_formats()
    name = name or str(fp)
    try:
        return Image.open(fp, formats=formats)
    except Image.UnidentifiedImageError:
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "rb") as f:
                prefix = f.read(16)
        else:
            fp.seek(0)
            prefix = fp.read(16)
        found = sniff_format(prefix)
        accepted = ", ".join(formats)
        if found is None:
            raise ImageFormatError(f"{name}: not an image file in an accepted format ({accepted})",
                                   None) from None
        raise ImageFormatError(f"{name}: {found} images are not accepted, only {accepted} (convert "
                               "it to PNG or JPEG)", found) from None


def load_image(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Open an image file, decode it fully and apply its EXIF orientation (as transformers'
    `load_image` does for files), raising ImageReadError that names the file. With `data`, the
    file's bytes are given (a member of a tar shard) and `path` only names it in errors."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too, since a
            # decompression bomb costs gigabytes before the resize throws them away.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(path if data is None else io.BytesIO(data), str(path)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except ImageFormatError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageReadError(f"{path}: cannot decode image ({e})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers converts it: anything with transparency is composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageProcessor:
    """Turns images into the (B, 3, H, W) float tensor the image tower takes."""

    height: int = 384
    width: int = 384
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict[str, Any], image_size: int) -> ImageProcessor:
        """Read a preprocessor_config.json dict; sizes missing there come from the model config."""
        for flag in _UNSUPPORTED_FLAGS:
            if d.get(flag):
                raise ValueError(f"preprocessor_config.json sets {flag}, which SigLIP preprocessing "
                                 "does not do")
        size = d.get("size") or {"height": image_size, "width": image_size}
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"preprocessor_config.json size must be {{'height', 'width'}}, got {size!r}")
        kw = {k: d[k] for k in ("resample", "do_resize", "do_rescale", "rescale_factor",
                                "do_normalize") if k in d}
        for k in ("image_mean", "image_std"):
            if k in d:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(height=int(size["height"]), width=int(size["width"]), **kw)

    def __post_init__(self) -> None:
        Image.Resampling(self.resample)  # raises ValueError for an unknown filter code
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")

    def prepare(self, image: ImageInput) -> Image.Image:
        """One input (PIL image, path, or HWC uint8 array) -> RGB PIL image at the model's size."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError("numpy images must be uint8 arrays of shape (H, W) or (H, W, C), "
                                 f"got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError("expected a PIL image, a path or a uint8 numpy array, got "
                            f"{type(image).__name__}")
        image = to_rgb(image)
        if self.do_resize:
            # A squash to the square, no crop: SigLIP was trained on whole images resized this way.
            image = image.resize((self.width, self.height), resample=self.resample)
        elif image.size != (self.width, self.height):
            raise ValueError(f"do_resize is off but the image is {image.size[0]}x{image.size[1]}, "
                             f"not {self.width}x{self.height}")
        return image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """An RGB image already at the model's size -> (3, H, W) float32."""
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
        if self.do_rescale:
            # float64 multiply, then float32: the order transformers uses, so the bits agree.
            x = (x.double() * self.rescale_factor).float()
        else:
            x = x.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def __call__(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """One image or a list -> (B, 3, H, W) float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        return torch.stack([self.to_tensor(self.prepare(im)) for im in images])
