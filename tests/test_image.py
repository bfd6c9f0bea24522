"""Pixel values equal transformers' SiglipImageProcessorPil bit for bit, in every PIL mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_so400m import ImageProcessor, ImageReadError, load_image


def noise_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    """Random pixels with a gradient: bicubic resampling of noise exercises every rounding."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img = Image.fromarray(rgba, "RGBA")
    if mode == "P_transparency":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        img.info["transparency"] = 3
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-500, 70000, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w)).astype(np.float32) * 300)
    return img.convert(mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P_transparency", "CMYK", "1", "I;16", "I", "F", "YCbCr"]


def reference(images, size: int) -> torch.Tensor:
    from transformers import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": size, "width": size})
    return proc(images=images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(640, 480), (97, 413), (384, 384), (20, 20)])
def test_pixels_match_transformers_pil_processor_bit_for_bit(mode, size):
    img = noise_image(*size, mode)
    expected = reference([img], 384)
    got = ImageProcessor(height=384, width=384)([img])
    assert got.dtype == torch.float32 and got.shape == (1, 3, 384, 384)
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"


def test_batch_of_mixed_images_and_paths(tmp_path):
    a = noise_image(300, 200, "RGB", 1)
    b = noise_image(50, 90, "RGBA", 2)
    b.save(tmp_path / "b.png")
    got = ImageProcessor(height=224, width=224)([a, tmp_path / "b.png", str(tmp_path / "b.png")])
    expected = reference([a, b, b], 224)
    assert torch.equal(got, expected)


def test_exif_orientation_of_files_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    img = noise_image(120, 60, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (60, 120)  # upright: portrait
    got = ImageProcessor(height=64, width=64)([path])
    assert torch.equal(got, reference([hf_load_image(str(path))], 64))


def test_preprocessor_config_is_read(tiny_ckpt):
    import json

    d = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    proc = ImageProcessor.from_dict(d, image_size=999)
    assert (proc.height, proc.width, proc.resample) == (32, 32, Image.Resampling.BICUBIC)
    assert proc.image_mean == (0.5, 0.5, 0.5) and proc.image_std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessor.from_dict({**d, "do_center_crop": True}, image_size=32)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    (b"", "not an image"),
    (b"plain text, not pixels", "not an image"),
])
def test_unreadable_files_are_reported_by_name(tmp_path, content, message):
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as e:
        load_image(path)
    assert "photo.jpg" in str(e.value)


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "cut.png"
    noise_image(200, 200, "RGB").save(path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ImageReadError, match="cut.png: cannot decode"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120k pixels: over PIL's warning line
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(path)


def test_wrong_input_types_are_refused():
    proc = ImageProcessor(height=32, width=32)
    with pytest.raises(TypeError, match="expected a PIL image"):
        proc([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="uint8"):
        proc([np.zeros((32, 32, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="no images"):
        proc([])
