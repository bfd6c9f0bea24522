"""big_vision's own SigLIP checkpoints (.npz) as Hugging Face state dicts, and their configs.

big_vision saves the flax parameter tree flattened into one .npz, names joined by "/" (with or without
a leading "params/"): `img/...` the image tower, `txt/...` the text tower, `t` and `b` the logit scale
and bias. The mapping is the one transformers' `convert_siglip_to_hf.py` and open_clip's
`load_big_vision_weights` use:

- Dense kernels are (in, out); torch's Linear weights are (out, in): transposed.
- Attention q/k/v kernels are (D, H, Dh) and biases (H, Dh) (flax DenseGeneral over heads); the out
  kernel is (H, Dh, D). They flatten to (D, H·Dh) and (H·Dh, D), then transpose.
- The patch conv kernel is HWIO (P, P, C, D); torch's Conv2d is OIHW.
- Encoder blocks are stored either per layer (`encoderblock_0`, `encoderblock_1`, ...) or stacked,
  as one `encoderblock` whose arrays carry a leading layer axis (nn.scan; so400m-patch14-224 and
  the i18n checkpoint were saved this way).
- The MAP head's q/k/v are concatenated into torch MultiheadAttention's in_proj (q, k, v order).
- The i18n checkpoint has no text head (`txt/head`): its text embedding is the pooled token itself.
  transformers' conversion gave it an identity head (weight I, bias 0), so we do the same, which
  keeps every checkpoint on one architecture.

This module only maps names and shapes; reading the file stays in weights.py (the only module that
touches the disk), which calls `to_state_dict` and `infer_config` on the arrays it has opened.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .config import SiglipConfig, TextConfig, VisionConfig
from .errors import SiglipError

# Within one encoder block: our (HF) name -> big_vision name.
_BLOCK = {
    "layer_norm1.weight": "LayerNorm_0/scale", "layer_norm1.bias": "LayerNorm_0/bias",
    "layer_norm2.weight": "LayerNorm_1/scale", "layer_norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    **{f"self_attn.{p}_proj.{w}": f"MultiHeadDotProductAttention_0/{n}/{k}"
       for p, n in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "out"))
       for w, k in (("weight", "kernel"), ("bias", "bias"))},
}
_ENCODERS = {"vision_model": "img/Transformer/", "text_model": "txt/Encoder_0/"}
_MAP = "img/MAPHead_0/"
_SINGLE = {
    "vision_model.embeddings.patch_embedding.weight": "img/embedding/kernel",
    "vision_model.embeddings.patch_embedding.bias": "img/embedding/bias",
    "vision_model.embeddings.position_embedding.weight": "img/pos_embedding",
    "vision_model.post_layernorm.weight": "img/Transformer/encoder_norm/scale",
    "vision_model.post_layernorm.bias": "img/Transformer/encoder_norm/bias",
    "vision_model.head.probe": _MAP + "probe",
    "vision_model.head.layernorm.weight": _MAP + "LayerNorm_0/scale",
    "vision_model.head.layernorm.bias": _MAP + "LayerNorm_0/bias",
    "vision_model.head.mlp.fc1.weight": _MAP + "MlpBlock_0/Dense_0/kernel",
    "vision_model.head.mlp.fc1.bias": _MAP + "MlpBlock_0/Dense_0/bias",
    "vision_model.head.mlp.fc2.weight": _MAP + "MlpBlock_0/Dense_1/kernel",
    "vision_model.head.mlp.fc2.bias": _MAP + "MlpBlock_0/Dense_1/bias",
    "vision_model.head.attention.out_proj.weight": _MAP + "MultiHeadDotProductAttention_0/out/kernel",
    "vision_model.head.attention.out_proj.bias": _MAP + "MultiHeadDotProductAttention_0/out/bias",
    "text_model.embeddings.token_embedding.weight": "txt/Embed_0/embedding",
    "text_model.embeddings.position_embedding.weight": "txt/pos_embedding",
    "text_model.final_layer_norm.weight": "txt/Encoder_0/encoder_norm/scale",
    "text_model.final_layer_norm.bias": "txt/Encoder_0/encoder_norm/bias",
    "text_model.head.weight": "txt/head/kernel",
    "text_model.head.bias": "txt/head/bias",
    "logit_scale": "t",
    "logit_bias": "b",
}
_QKV = ("query", "key", "value")
_OPTIONAL = {"txt/head/kernel", "txt/head/bias"}  # absent in the i18n checkpoint


class BigVisionError(SiglipError, ValueError):
    """A .npz whose arrays are not a big_vision SigLIP parameter tree."""


def strip_prefix(names: list[str]) -> str:
    """The root prefix of a checkpoint's names: "params/" (big_vision's save) or "" (already cut)."""
    return "params/" if any(n.startswith("params/") for n in names) else ""


def _stacked(names: set[str], enc: str) -> bool:
    return f"{enc}encoderblock/LayerNorm_0/scale" in names


def _num_layers(names: set[str], arrays: Mapping[str, np.ndarray], enc: str) -> int:
    if _stacked(names, enc):
        return int(arrays[f"{enc}encoderblock/LayerNorm_0/scale"].shape[0])
    n = 0
    while f"{enc}encoderblock_{n}/LayerNorm_0/scale" in names:
        n += 1
    return n


def expected_names(names: set[str], arrays: Mapping[str, np.ndarray]) -> set[str]:
    """Every array name a SigLIP parameter tree in this file's layout holds (without the prefix)."""
    out = set(_SINGLE.values()) | {
        _MAP + f"MultiHeadDotProductAttention_0/{n}/{k}" for n in _QKV for k in ("kernel", "bias")}
    for enc in _ENCODERS.values():
        if _stacked(names, enc):
            out |= {f"{enc}encoderblock/{v}" for v in _BLOCK.values()}
        else:
            L = max(_num_layers(names, arrays, enc), 1)
            out |= {f"{enc}encoderblock_{i}/{v}" for i in range(L) for v in _BLOCK.values()}
    return out


def check_names(arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Raise one message listing missing and unknown arrays."""
    names = set(arrays)
    expected = expected_names(names, arrays)
    optional = _OPTIONAL if not names & _OPTIONAL else set()  # the text head: both arrays or neither
    missing = sorted(expected - names - optional)
    unknown = sorted(names - expected)
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing arrays: " + _cut(missing))
        if unknown:
            parts.append("unknown arrays: " + _cut(unknown))
        raise BigVisionError(f"{where} is not a big_vision SigLIP checkpoint: " + "; ".join(parts)
                             + " (a SigLIP .npz holds img/..., txt/..., t and b)")


def _cut(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _block_array(arrays: Mapping[str, np.ndarray], names: set[str], enc: str, i: int, sub: str) -> np.ndarray:
    if _stacked(names, enc):
        return arrays[f"{enc}encoderblock/{sub}"][i]  # the leading axis is the layer
    return arrays[f"{enc}encoderblock_{i}/{sub}"]


def _to_torch(hf_name: str, a: np.ndarray) -> np.ndarray:
    """One big_vision array -> the layout of our parameter of that name."""
    if hf_name.endswith("patch_embedding.weight"):
        return a.transpose(3, 2, 0, 1)  # HWIO (P, P, C, D) -> OIHW (D, C, P, P)
    if hf_name.endswith("position_embedding.weight"):
        return a.reshape(-1, a.shape[-1])  # (1, N, D) -> (N, D)
    if any(p in hf_name for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return a.reshape(a.shape[0], -1).T  # (D, H, Dh) -> (D, H·Dh) -> (H·Dh, D)
    if "out_proj.weight" in hf_name:
        return a.reshape(-1, a.shape[-1]).T  # (H, Dh, D) -> (H·Dh, D) -> (D, H·Dh)
    if hf_name.endswith("token_embedding.weight") or hf_name.endswith("probe"):
        return a  # (V, D) and (1, 1, D) as they are
    if hf_name.endswith(".weight") and a.ndim == 2:
        return a.T  # Dense (in, out) -> Linear (out, in)
    return a.reshape(-1)  # biases (H, Dh) or (D,), LayerNorm scales, t and b (1,)


def to_state_dict(arrays: Mapping[str, np.ndarray], config: SiglipConfig,
                  keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """big_vision arrays (names without the "params/" prefix) -> our state dict, or only `keys` of it.

    `config` decides the layer counts; names are assumed checked by `check_names`.
    """
    names = set(arrays)
    out: dict[str, np.ndarray] = {}

    def want(k: str) -> bool:
        return keys is None or k in keys

    for hf, bv in _SINGLE.items():
        if want(hf) and bv in names:
            out[hf] = _to_torch(hf, arrays[bv])
    layers = {"vision_model": config.vision_config.num_hidden_layers,
              "text_model": config.text_config.num_hidden_layers}
    for tower, enc in _ENCODERS.items():
        # Array by array, then layer by layer: a stacked array is read once for all its layers.
        for hf, bv in _BLOCK.items():
            for i in range(layers[tower]):
                k = f"{tower}.encoder.layers.{i}.{hf}"
                if want(k):
                    out[k] = _to_torch(k, _block_array(arrays, names, enc, i, bv))
    mha = _MAP + "MultiHeadDotProductAttention_0/"
    if want("vision_model.head.attention.in_proj_weight"):
        out["vision_model.head.attention.in_proj_weight"] = np.concatenate(
            [arrays[f"{mha}{n}/kernel"].reshape(arrays[f"{mha}{n}/kernel"].shape[0], -1).T for n in _QKV])
    if want("vision_model.head.attention.in_proj_bias"):
        out["vision_model.head.attention.in_proj_bias"] = np.concatenate(
            [arrays[f"{mha}{n}/bias"].reshape(-1) for n in _QKV])
    if "txt/head/kernel" not in names:
        D = config.text_config.hidden_size  # the i18n checkpoint: identity head, as transformers converted it
        if want("text_model.head.weight"):
            out["text_model.head.weight"] = np.eye(D, dtype=np.float32)
        if want("text_model.head.bias"):
            out["text_model.head.bias"] = np.zeros(D, dtype=np.float32)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def infer_config(arrays: Mapping[str, np.ndarray]) -> SiglipConfig:
    """A SigLIP config read off the array shapes (every so400m field follows from them).

    The image size is the one thing shapes cannot pin down: a 27x27 grid of 14 px patches fits any
    size from 378 to 391 px. We take the smallest multiple of 16 px that gives the grid (384 for
    so400m-patch14-384, 224 and 256 exactly for the others), the size every SigLIP was released at;
    pass config= for anything else.
    """
    names = set(arrays)
    P, _, C, _ = arrays["img/embedding/kernel"].shape  # HWIO
    grid = round(float(np.sqrt(np.prod(arrays["img/pos_embedding"].shape[:-1]))))
    size = -(-grid * P // 16) * 16
    if size // P != grid:
        size = grid * P

    def tower(enc: str) -> dict:
        q = _block_array(arrays, names, enc, 0, "MultiHeadDotProductAttention_0/query/kernel")
        fc1 = _block_array(arrays, names, enc, 0, "MlpBlock_0/Dense_0/kernel")
        return dict(hidden_size=int(q.shape[0]), num_attention_heads=int(q.shape[1]),
                    intermediate_size=int(fc1.shape[-1]), num_hidden_layers=_num_layers(names, arrays, enc))

    vocab, Dt = arrays["txt/Embed_0/embedding"].shape
    proj = int(arrays["txt/head/kernel"].shape[-1]) if "txt/head/kernel" in names else int(Dt)
    vision = VisionConfig(**tower("img/Transformer/"), num_channels=int(C), image_size=int(size),
                          patch_size=int(P))
    text = TextConfig(**tower("txt/Encoder_0/"), vocab_size=int(vocab),
                      max_position_embeddings=int(np.prod(arrays["txt/pos_embedding"].shape[:-1])),
                      projection_size=proj)
    return SiglipConfig(vision_config=vision, text_config=text)
