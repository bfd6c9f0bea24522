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

# What counts as an image file when a folder is given (CLI, training data).
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm".split())

# Keys of preprocessor_config.json that would ask for processing SigLIP never does.
_UNSUPPORTED_FLAGS = ("do_center_crop", "do_pad")


class ImageReadError(ValueError):
    """An image file that is missing, unreadable, truncated, too large or not an image."""


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
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file PIL can read") from None
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
