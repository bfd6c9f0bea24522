"""The architecture against transformers.SiglipModel on a tiny random checkpoint, plus the
properties that need no reference: gradients, batch invariance, towers alone, init, state dict."""

from __future__ import annotations

import json
import math

import pytest
import torch

import siglip_so400m
from siglip_so400m import SigLIP, SiglipConfig, sigmoid_loss
from siglip_so400m.testing import SO400M_CONFIG, hf_config

TEXTS = ["a photo of 2 cats", "a red circle", "", "Café naïve résumé", "東京 猫 😀", "x " * 80]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return siglip_so400m.load(tiny_ckpt)


@pytest.fixture(scope="module")
def inputs(tiny):
    _, proc = tiny
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(len(TEXTS), 3, 32, 32, generator=g) * 2 - 1
    return pixels, proc.texts(TEXTS)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_embeddings_logits_and_loss_match_transformers_tiny(tiny, inputs, tiny_ckpt, attn):
    from transformers import SiglipModel

    model, _ = tiny
    pixels, ids = inputs
    hf = SiglipModel.from_pretrained(tiny_ckpt, attn_implementation=attn).eval()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, return_loss=True)
        ref_img = hf.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids).pooler_output
        img = model.encode_image(pixels)
        txt = model.encode_text(ids)
        img_n, txt_n = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
        logits = model(pixels, ids)
        loss = sigmoid_loss(img_n, txt_n, model.logit_scale, model.logit_bias)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img_n, ref.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt_n, ref.text_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-6)
    assert logits.shape == (len(TEXTS), len(TEXTS))
    assert logits.std() > 0.1  # the random checkpoint gives logits that differ, so the check bites


def test_gradient_reaches_every_parameter(tiny_config):
    cfg = SiglipConfig.from_dict(tiny_config.to_dict())
    torch.manual_seed(0)
    model = SigLIP(cfg).train()
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(0, cfg.text_config.vocab_size, (4, 64))
    img = model.encode_image(pixels, normalize=True)
    txt = model.encode_text(ids, normalize=True)
    sigmoid_loss(img, txt, model.logit_scale, model.logit_bias).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name != "text_model.embeddings.token_embedding.weight":  # only the rows of used tokens
            assert p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("per_image", [False, True])
def test_an_item_alone_equals_it_inside_a_batch(tiny, inputs, monkeypatch, per_image):
    model, _ = tiny
    pixels, ids = inputs
    # Off, the image tower runs the batch whole, so this compares a batch with single items (on, a
    # CPU batch goes one image at a time and the image half would compare the loop with itself).
    monkeypatch.setattr(model.vision_model, "per_image_on_cpu", per_image)
    with torch.no_grad():
        batch_img, batch_txt = model.encode_image(pixels), model.encode_text(ids)
        for i in range(len(TEXTS)):
            torch.testing.assert_close(model.encode_image(pixels[i : i + 1])[0], batch_img[i],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.encode_text(ids[i : i + 1])[0], batch_txt[i],
                                       atol=1e-5, rtol=1e-5)


def test_from_scratch_init_uses_the_papers_temperature_and_bias(tiny_config):
    model = SigLIP(SiglipConfig.from_dict(tiny_config.to_dict()))
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    # LeCun-normal patch embedding: std sqrt(1 / fan_in), fan_in = 3 * 7 * 7
    w = model.vision_model.embeddings.patch_embedding.weight
    assert w.std().item() == pytest.approx(math.sqrt(1 / 147), rel=0.1)


def test_each_tower_loads_alone_without_reading_the_other(tiny_ckpt, inputs, tiny, record_reads):
    read = record_reads(siglip_so400m.weights)
    pixels, ids = inputs
    full, _ = tiny
    vision, _ = siglip_so400m.load(tiny_ckpt, towers=("vision",))
    assert read and not any(k.startswith("text_model.") for k in read)
    assert vision.text_model is None
    assert not any(k.startswith("text_model.") for k in vision.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(vision.encode_image(pixels), full.encode_image(pixels), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="text tower was not loaded"):
        vision.encode_text(ids)
    read.clear()
    text, _ = siglip_so400m.load(tiny_ckpt, towers=("text",))
    assert read and not any(k.startswith("vision_model.") for k in read)
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(ids), full.encode_text(ids), atol=0, rtol=0)


def test_state_dict_names_and_shapes_equal_transformers_so400m():
    from transformers import SiglipModel

    hub = json.loads(SO400M_CONFIG.read_text())
    with torch.device("meta"):
        ours = SigLIP(SiglipConfig.from_dict(hub)).state_dict()
        theirs = SiglipModel(hf_config(hub["vision_config"], hub["text_config"])).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    assert len(ours) == 888
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_bad_inputs_to_the_towers_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 7x7 patch"):
        model.encode_image(torch.zeros(1, 3, 6, 32))
    with pytest.raises(ValueError, match="L <= 64"):
        model.encode_text(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode_text(torch.ones(1, 64))


def test_gradients_flow_through_every_public_method(tiny_config):
    """forward, logits, encode_image, encode_text and image_features all train: a loss on any of them
    reaches the parameters it depends on (t' and b included for forward and logits)."""
    cfg = SiglipConfig.from_dict(tiny_config.to_dict())
    torch.manual_seed(0)
    model = SigLIP(cfg).train()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, cfg.text_config.vocab_size, (3, 64))
    img, txt = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
    calls = {
        "forward": lambda: model(pixels, ids),
        "logits": lambda: model.logits(img, txt),
        "encode_image": lambda: model.encode_image(pixels),
        "encode_text": lambda: model.encode_text(ids),
        "image_features": lambda: model.image_features(pixels, layers=(-1, 1))[0],
    }
    for name, call in calls.items():
        model.zero_grad(set_to_none=True)
        out = call()
        assert out.requires_grad, name
        out.square().mean().backward(retain_graph=name == "logits")
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if name in ("forward", "logits"):
            assert {"logit_scale", "logit_bias"} <= got, name
        tower = "text_model." if name == "encode_text" else None if name == "logits" else "vision_model."
        if tower:
            assert any(n.startswith(tower) for n in got), name
    # A loss on forward's logits added to another term still trains t' and b (it silently did not).
    model.zero_grad(set_to_none=True)
    logits = model(pixels, ids)
    target = 2 * torch.eye(3) - 1
    (-torch.nn.functional.logsigmoid(target * logits).mean() + 0.0 * img.sum()).backward()
    assert model.logit_scale.grad.abs().item() > 0 and model.logit_bias.grad.abs().item() > 0
