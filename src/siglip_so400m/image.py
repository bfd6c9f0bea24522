"""Image preprocessing: RGB, bicubic squash to the model's size, x/255, then (x - 0.5) / 0.5.

Bit for bit what transformers' `SiglipImageProcessorPil` computes: the same PIL resize on the
uint8 image, the rescale in float64 then a cast to float32, and the normalisation in float32.

SigLIP 2 NaFlex (`NaFlexImageProcessor`, as transformers' `Siglip2ImageProcessorPil`) keeps each
image's aspect ratio instead: it is resized (bilinear) to the largest patch grid h x w with
h * w <= max_num_patches, cut into h * w patches and padded, giving `NaFlexPixels`.
"""

from __future__ import annotations

import glob
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import SiglipError

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


class ImageReadError(SiglipError, ValueError):
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


# The columns of a list of images (embed's .csv/.parquet lists, fine-tuning's .csv/.jsonl) that
# hold the image paths and the captions, the first one present taken: one list, so that the same
# file means the same images to every job. image_path first: clip-retrieval's name.
IMAGE_COLUMNS = ("image_path", "image", "path", "file_name", "filename", "filepath")
CAPTION_COLUMNS = ("caption", "text")


def list_columns(columns: Sequence[str]) -> tuple[str | None, str | None]:
    """(image column, caption column) of a table with these columns; None where there is none."""
    return (next((c for c in IMAGE_COLUMNS if c in columns), None),
            next((c for c in CAPTION_COLUMNS if c in columns), None))


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
        image = open_rgb(image)
        if self.do_resize:
            # A squash to the square, no crop: SigLIP was trained on whole images resized this way.
            image = image.resize((self.width, self.height), resample=self.resample)
        elif image.size != (self.width, self.height):
            raise ValueError(f"do_resize is off but the image is {image.size[0]}x{image.size[1]}, "
                             f"not {self.width}x{self.height}")
        return image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """An RGB image already at the model's size -> (3, H, W) float32."""
        return _rescale_normalize(self, image)

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """to_tensor() results -> the batch the model takes, (B, 3, H, W)."""
        return torch.stack(list(items))

    def __call__(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """One image or a list -> (B, 3, H, W) float32."""
        return self.collate([self.to_tensor(self.prepare(im)) for im in _as_list(images)])


def _as_list(images: ImageInput | list[ImageInput]) -> list[ImageInput]:
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given")
    return list(images)


def open_rgb(image: ImageInput) -> Image.Image:
    """One input (PIL image, path, or HWC uint8 array) -> an RGB PIL image."""
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
    return to_rgb(image)


def _rescale_normalize(proc: ImageProcessor | NaFlexImageProcessor, image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float32, rescaled and normalized as `proc` says."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
    if proc.do_rescale:
        # float64 multiply, then float32: the order transformers uses, so the bits agree.
        x = (x.double() * proc.rescale_factor).float()
    else:
        x = x.float()
    if proc.do_normalize:
        mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(proc.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
    return x


@dataclass(frozen=True)
class NaFlexPixels:
    """A batch of SigLIP 2 NaFlex inputs: each image's patches at its own aspect ratio, padded.

    Letters: B images, N patch slots (an image's own h * w first, then padding), P patch size.
    `patches` (B, N, P * P * 3) float32: row-major patches, each flattened channel-last (as
    transformers' Siglip2ImageProcessor), zeros past an image's own; `mask` (B, N) bool, True on an
    image's own h * w patches; `spatial_shapes` (B, 2) int64, each image's grid (h, w). The model
    never attends to, pools or returns the padding, so how far a batch is padded changes nothing."""

    patches: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def __post_init__(self) -> None:
        B = self.patches.shape[0] if self.patches.ndim == 3 else -1
        if B < 0 or self.mask.shape != self.patches.shape[:2] or self.spatial_shapes.shape != (B, 2):
            raise ValueError(f"NaFlexPixels need patches (B, N, P*P*C), mask (B, N) and spatial_shapes "
                             f"(B, 2); got {tuple(self.patches.shape)}, {tuple(self.mask.shape)} and "
                             f"{tuple(self.spatial_shapes.shape)}")

    def __len__(self) -> int:
        return self.patches.shape[0]

    @property
    def device(self) -> torch.device:
        return self.patches.device

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> NaFlexPixels:
        """On `device`, the patches in `dtype` (the mask and grid sizes keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return NaFlexPixels(self.patches.to(device=device, dtype=dtype), self.mask.to(device),
                            self.spatial_shapes.to(device))

    def __getitem__(self, index: int | slice) -> NaFlexPixels:
        """Images `index` (an int keeps the batch dimension: one image is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return NaFlexPixels(self.patches[index], self.mask[index], self.spatial_shapes[index])

    def lengths(self) -> list[int]:
        """Each image's own number of patches, h * w."""
        return [h * w for h, w in self.spatial_shapes.tolist()]

    def unpadded(self) -> list[NaFlexPixels]:
        """Each image alone as a batch of one, without padding."""
        return [NaFlexPixels(self.patches[i : i + 1, :n], self.mask[i : i + 1, :n],
                             self.spatial_shapes[i : i + 1]) for i, n in enumerate(self.lengths())]

    @classmethod
    def cat(cls, batches: Sequence[NaFlexPixels], length: int | None = None) -> NaFlexPixels:
        """Batches of any lengths -> one batch padded to `length` (default: the longest image)."""
        if not batches:
            raise ValueError("no images given")
        need = max(max(b.lengths(), default=0) for b in batches)
        N = need if length is None else length
        if need > N:
            raise ValueError(f"cannot pad to {N} patches: an image has {need}")
        pad = torch.nn.functional.pad
        cut = [(b.patches[:, :N], b.mask[:, :N]) for b in batches]
        patches = torch.cat([pad(x, (0, 0, 0, N - x.shape[1])) for x, _ in cut])  # (B, N, P*P*C)
        mask = torch.cat([pad(m, (0, N - m.shape[1])) for _, m in cut])  # (B, N)
        return cls(patches, mask, torch.cat([b.spatial_shapes for b in batches]))


@dataclass(frozen=True)
class NaFlexImageProcessor:
    """SigLIP 2 NaFlex preprocessing: each image at its aspect ratio, as patches within a budget."""

    patch_size: int = 16
    max_num_patches: int = 256
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict[str, Any], patch_size: int) -> NaFlexImageProcessor:
        """Read a Siglip2ImageProcessor preprocessor_config.json dict (patch size from the model
        config where the file has none; max_num_patches 256, transformers' default)."""
        for flag in _UNSUPPORTED_FLAGS:
            if d.get(flag):
                raise ValueError(f"preprocessor_config.json sets {flag}, which SigLIP 2 NaFlex "
                                 "preprocessing does not do")
        kw = {k: d[k] for k in ("max_num_patches", "resample", "do_resize", "do_rescale",
                                "rescale_factor", "do_normalize") if k in d}
        for k in ("image_mean", "image_std"):
            if k in d:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(patch_size=int(d.get("patch_size", patch_size)), **kw)

    def __post_init__(self) -> None:
        Image.Resampling(self.resample)  # raises ValueError for an unknown filter code
        for name in ("patch_size", "max_num_patches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer (a number of patches of the "
                                 f"image's own grid, e.g. 256), got {v!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The size (in pixels, multiples of the patch size) an image of height x width is resized
        to: the largest scale whose grid ceil(h s / P) x ceil(w s / P), each side at least one patch,
        holds at most max_num_patches, found by bisection on s in [1e-6, 100] to 1e-5, as
        transformers' get_image_size_for_max_num_patches finds it (the same float steps, so the
        same sizes). An image is enlarged at most 100x."""
        P = self.patch_size

        def side(scale: float, n: int) -> int:
            return max(P, math.ceil(n * scale / P) * P)

        lo, hi = 1e-6, 100.0
        while hi - lo >= 1e-5:
            mid = (lo + hi) / 2
            if (side(mid, height) / P) * (side(mid, width) / P) <= self.max_num_patches:
                lo = mid
            else:
                hi = mid
        H, W = side(lo, height), side(lo, width)
        if self.max_num_patches < (H // P) * (W // P):
            raise ValueError(f"an image of {width}x{height} pixels cannot fit in max_num_patches="
                             f"{self.max_num_patches} patches of {P} px even at the smallest scale; "
                             "raise max_num_patches or crop the image")
        return H, W

    def prepare(self, image: ImageInput) -> Image.Image:
        """One input (PIL image, path, or HWC uint8 array) -> RGB PIL image at its patch grid's size."""
        image = open_rgb(image)
        if self.do_resize:
            H, W = self.target_size(image.height, image.width)
            image = image.resize((W, H), resample=self.resample)
        else:
            P = self.patch_size
            n = (image.height // P) * (image.width // P)
            if image.height % P or image.width % P or not 1 <= n <= self.max_num_patches:
                raise ValueError(f"do_resize is off but the image is {image.width}x{image.height}, "
                                 f"not a whole grid of {P} px patches within max_num_patches="
                                 f"{self.max_num_patches}")
        return image

    def to_tensor(self, image: Image.Image) -> NaFlexPixels:
        """An RGB image at its grid's size (from prepare) -> NaFlexPixels of one image, unpadded."""
        P = self.patch_size
        x = _rescale_normalize(self, image)  # (3, H, W) float32
        C, H, W = x.shape
        h, w = H // P, W // P
        patches = x.reshape(C, h, P, w, P).permute(1, 3, 2, 4, 0).reshape(1, h * w, P * P * C)
        return NaFlexPixels(patches, torch.ones(1, h * w, dtype=torch.bool), torch.tensor([[h, w]]))

    def collate(self, items: Sequence[NaFlexPixels]) -> NaFlexPixels:
        """to_tensor() results -> one batch, padded to the longest image in it."""
        return NaFlexPixels.cat(items)

    def __call__(self, images: ImageInput | list[ImageInput]) -> NaFlexPixels:
        """One image or a list -> NaFlexPixels padded to max_num_patches, as transformers pads."""
        items = [self.to_tensor(self.prepare(im)) for im in _as_list(images)]
        return NaFlexPixels.cat(items, length=self.max_num_patches)


def expand_images(specs: list[str]) -> Iterator[tuple[str, str | None]]:
    """(path, None) per image to try, or (spec, error) for a pattern or folder with nothing in it."""
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                yield spec, "no image files in this folder"
            yield from ((str(f), None) for f in files)
        elif not path.exists() and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                yield spec, "no files match this pattern"
            yield from ((m, None) for m in matches)
        else:
            yield spec, None  # a missing file is reported when it is read
