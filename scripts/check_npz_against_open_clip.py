"""Our big_vision .npz reader against an independent one: open_clip's `load_big_vision_weights`.

open_clip needs timm and torchvision, which cannot be installed beside the project's CPU torch, so
this runs in a separate environment that has open_clip, timm and transformers:

    PYTHONPATH=src /work/peers/bin/python scripts/check_npz_against_open_clip.py

For each checkpoint family (SigLIP with a text head, i18n without one, SigLIP 2) and each block
layout (encoderblock_N per layer, stacked encoderblock), it writes a tiny random big_vision .npz
(`siglip_so400m.testing.write_big_vision_npz`, from a random transformers SiglipModel), loads it
three ways and prints the largest differences:

- ours: `siglip_so400m.load(npz)`;
- open_clip: `load_big_vision_weights` into a CustomTextCLIP of the same tiny shape (a timm ViT with
  a MAP head, registered here with tanh-GELU as SigLIP uses);
- transformers: the SiglipModel the file was written from (checks the writer itself).

Exit status 1 if ours and open_clip differ by more than 1e-5 anywhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def _register_tiny_timm(size: int, patch: int, width: int, depth: int, heads: int, mlp_ratio: float) -> str:
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import _create_vision_transformer

    name = f"vit_tiny_siglip_check_{size}_p{patch}"
    if is_model(name):  # registered by an earlier case of the same shape
        return name

    def create(pretrained: bool = False, **kwargs):
        # open_clip's TimmModel does not pass the image size on, so the registered model fixes it.
        args = dict(img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                    mlp_ratio=mlp_ratio, class_token=False, global_pool="map", act_layer="gelu_tanh")
        return _create_vision_transformer("vit_so400m_patch14_siglip_224", pretrained=pretrained,
                                          **dict(args, **kwargs))

    create.__name__ = name
    register_model(create)
    return name


def check(name: str, stacked: bool, tmp: Path) -> float:
    import open_clip
    from open_clip.convert import load_big_vision_weights
    from transformers import SiglipModel

    import siglip_so400m
    from siglip_so400m.testing import (
        CHECKPOINTS,
        family_hf_config,
        randomize,
        train_tokenizer,
        write_big_vision_npz,
    )

    family = CHECKPOINTS[name]
    tok_model = train_tokenizer(family.tokenizer, tmp / family.tokenizer)
    cfg = family_hf_config(family, tok_model, tiny=True)
    torch.manual_seed(0)
    hf = SiglipModel(cfg).eval()
    randomize(hf)
    head = family.tokenizer != "i18n"
    if not head:  # the i18n checkpoint has no text head: big_vision pools without one
        with torch.no_grad():
            hf.text_model.head.weight.copy_(torch.eye(cfg.text_config.hidden_size))
            hf.text_model.head.bias.zero_()
    npz = write_big_vision_npz(tmp / f"{name.split('/')[1]}-{stacked}.npz", hf.state_dict(), cfg,
                               stacked=stacked, text_head=head)
    (tmp / "config.json").write_text(cfg.to_json_string())
    ours, _ = siglip_so400m.load(str(npz), config=tmp / "config.json", tokenizer=tok_model)

    v, t = cfg.vision_config, cfg.text_config
    timm_name = _register_tiny_timm(v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers,
                                    v.num_attention_heads, v.intermediate_size / v.hidden_size)
    oc = open_clip.model.CustomTextCLIP(
        embed_dim=v.hidden_size,
        vision_cfg=dict(image_size=v.image_size, timm_model_name=timm_name, timm_model_pretrained=False,
                        timm_pool="map", timm_proj="none"),
        text_cfg=dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                      heads=t.num_attention_heads, layers=t.num_hidden_layers,
                      mlp_ratio=t.intermediate_size / t.hidden_size, no_causal_mask=True, pool_type="last",
                      proj_type="linear" if head else "none", proj_bias=True, norm_kwargs={"eps": 1e-6},
                      act_kwargs={"approximate": "tanh"}),
        init_logit_bias=-10.0).eval()
    load_big_vision_weights(oc, str(npz))

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, v.image_size, v.image_size, generator=g) * 2 - 1
    ids = torch.randint(0, t.vocab_size, (4, t.max_position_embeddings), generator=g)
    with torch.no_grad():
        ours_img, ours_txt = ours.encode_image(pixels), ours.encode_text(ids)
        oc_img, oc_txt = oc.encode_image(pixels), oc.encode_text(ids)
        hf_img, hf_txt = hf.get_image_features(pixel_values=pixels), hf.get_text_features(input_ids=ids)
        hf_img = getattr(hf_img, "pooler_output", hf_img)
        hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
    d_oc = max((ours_img - oc_img).abs().max().item(), (ours_txt - oc_txt).abs().max().item(),
               abs(ours.logit_scale.item() - oc.logit_scale.item()),
               abs(ours.logit_bias.item() - oc.logit_bias.item()))
    d_hf = max((oc_img - hf_img).abs().max().item(), (oc_txt - hf_txt).abs().max().item())
    layout = "stacked encoderblock" if stacked else "encoderblock_N"
    print(f"{name:42s} {layout:21s} ours vs open_clip {d_oc:.2e}   open_clip vs transformers {d_hf:.2e}")
    return d_oc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args()
    names = ["google/siglip-so400m-patch14-224", "google/siglip-so400m-patch16-256-i18n",
             "google/siglip2-so400m-patch16-384"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for stacked in (False, True):
                worst = max(worst, check(name, stacked, Path(tmp)))
    ok = worst <= args.tolerance
    print(f"max |ours - open_clip| = {worst:.2e} ({'within' if ok else 'OVER'} {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
