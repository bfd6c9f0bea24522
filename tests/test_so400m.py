"""The full so400m shape (random weights, saved by transformers in the Hub layout, 3.5 GB) loaded by
our loader, against transformers.SiglipModel loaded from the same folder, fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import siglip_so400m

pytestmark = pytest.mark.slow

TEXTS = ["a photo of 2 cats", "This is a photo of a plane.", "", "東京 猫 😀 café"]


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    shapes = Image.new("RGBA", (300, 500), (20, 120, 200, 255))
    shapes.paste((250, 30, 30, 128), (40, 60, 200, 300))
    return [noisy, shapes]


@pytest.fixture(scope="module")
def both(so400m_ckpt):
    from transformers import SiglipModel

    ours, proc = siglip_so400m.load(so400m_ckpt)
    theirs = SiglipModel.from_pretrained(so400m_ckpt).eval()
    return ours, proc, theirs


def test_full_size_weights_equal_what_transformers_loads(both):
    ours, _, theirs = both
    ref = {k: v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")}
    got = ours.state_dict()
    assert len(got) == 888 and got.keys() == ref.keys()
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k


def test_image_and_text_embeds_match_transformers_so400m(both, so400m_ckpt):
    from transformers import SiglipImageProcessorPil, SiglipTokenizer

    ours, proc, theirs = both
    pixels, ids = proc.images(photos()), proc.texts(TEXTS)
    hf_pixels = SiglipImageProcessorPil.from_pretrained(so400m_ckpt)(photos(), return_tensors="pt")
    hf_ids = SiglipTokenizer.from_pretrained(so400m_ckpt)(
        TEXTS, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(pixels, hf_pixels["pixel_values"]) and torch.equal(ids, hf_ids["input_ids"])

    with torch.inference_mode():
        ref = theirs(pixel_values=pixels, input_ids=ids, return_loss=False)
        img = ours.encode_image(pixels, normalize=True)
        txt = ours.encode_text(ids, normalize=True)
        logits = ours.logits(img, txt)
    d_img = (img - ref.image_embeds).abs().max().item()
    d_txt = (txt - ref.text_embeds).abs().max().item()
    d_logit = (logits - ref.logits_per_image).abs().max().item()
    print(f"\nso400m fp32 max |diff|: image {d_img:.2e}, text {d_txt:.2e}, logits {d_logit:.2e}")
    assert d_img < 1e-5 and d_txt < 1e-5 and d_logit < 1e-3
    assert ref.logits_per_image.std() > 0.01  # the logits differ across pairs: the check has teeth
