"""SigLIP So400m/14 (Zhai et al. 2023; shape from Alabdulmohsin et al. 2023), the architecture only.

Letters: B batch, N tokens, D width, H heads, Dh head dim, L text length, P patch size.

    image (B,3,384,384) -> conv 14/14 -> (B,729,1152) + pos
        -> 27 x [LN -> attn(16 heads) -> +, LN -> MLP(4304) -> +] -> LN
        -> MAP head (a learned probe attends over the 729 tokens) -> (B,1152)
    text (B,64) -> token + pos -> the same encoder (bidirectional, no mask) -> LN
        -> last token -> Linear -> (B,1152)
    logits = exp(t') * cos(image, text) + b

SigLIP 2 NaFlex (google/siglip2-so400m-patch16-naflex) differs in the image embeddings only:

    patches (B,N,768) of each image at its own aspect ratio (h x w <= max_num_patches, padded to N)
        -> Linear(768 -> 1152) + the 16x16 position table resized to (h, w) (bilinear, antialias)
        -> the same encoder and MAP head, the padding masked out as keys everywhere

Differences from CLIP worth knowing: no class token (MAP pooling instead), no causal mask in the
text tower and no attention mask at all (texts are padded to 64 with the EOS id and the model was
trained that way), the text tower pools the *last* position (always padding/EOS), and the logits
get a learned bias b so a sigmoid, not a softmax, turns them into probabilities.

Module and parameter names equal the Hugging Face checkpoint keys, so loading is a strict
`load_state_dict` with no renaming.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import SiglipConfig, TextConfig, VisionConfig
from .image import NaFlexPixels
from .kernels import attention, linear, projections


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the checkpoint's layout)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, last_only: bool = False, mask: Tensor | None = None) -> Tensor:
        """Attention over all of x (over the keys where `mask`, (B, 1, 1, N) bool, is True); with
        last_only, for the last position's query alone."""
        B, N, D = x.shape
        H = self.num_heads
        if last_only:
            q = linear(x[:, -1:], self.q_proj)
            k, v = projections(x, (self.k_proj, self.v_proj))
        else:
            q, k, v = projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, -1, H, D // H).transpose(1, 2)  # (B, H, Nq, Dh)
        k = k.view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, Dh)
        v = v.view(B, N, H, D // H).transpose(1, 2)
        y = attention(q, k, v, self.dropout if self.training else 0.0, mask)  # (B, H, Nq, Dh)
        return linear(y.transpose(1, 2).reshape(B, -1, D), self.out_proj)


class MLP(nn.Module):
    """Two linear layers with the tanh approximation of GELU between them (as big_vision trained)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.fc1, gelu=True), self.fc2)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor, last_only: bool = False, mask: Tensor | None = None) -> Tensor:
        x = (x[:, -1:] if last_only else x) + self.self_attn(self.layer_norm1(x), last_only, mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of blocks; one class serves both towers."""

    def __init__(self, cfg: VisionConfig | TextConfig, num_layers: int | None = None):
        super().__init__()
        self.gradient_checkpointing = False
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                         cfg.layer_norm_eps, cfg.attention_dropout)
            for _ in range(cfg.num_hidden_layers if num_layers is None else num_layers)
        )

    def blocks(self, x: Tensor, depth: int | None = None, last_only: bool = False,
               mask: Tensor | None = None) -> Iterator[Tensor]:
        """Yields the output of each of the first `depth` blocks (all by default), (B, N, D) each;
        with last_only the final one computes the last position alone (B, 1, D), all the text
        tower pools. `mask` (B, 1, 1, N) bool hides padding keys (NaFlex batches)."""
        layers = self.layers[:depth]
        for i, layer in enumerate(layers):
            last = last_only and i == len(layers) - 1
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, last, mask, use_reentrant=False)
            else:
                x = layer(x, last, mask)
            yield x

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        for y in self.blocks(x, last_only=last_only):
            x = y
        return x


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches through a conv, plus a learned position per patch (no class token).
    NaFlex: patches already cut by the processor, through a Linear (the same map as the conv)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        P, C = cfg.patch_size, cfg.num_channels
        self.grid = cfg.grid_size  # the learned table's side, g
        self.naflex = cfg.naflex
        if cfg.naflex:
            self.patch_embedding = nn.Linear(C * P * P, cfg.hidden_size)
        else:
            self.patch_embedding = nn.Conv2d(C, cfg.hidden_size, kernel_size=P, stride=P)
        self.position_embedding = _embedding(cfg.num_positions, cfg.hidden_size)
        self._resized: dict = {}  # (h, w, dtype, device) -> (source table, its stamp, resized table)

    def patches(self, patches: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """NaFlex: (B, N, P*P*C) patches, each image's grid (h, w) -> (B, N, D) embeddings. An
        image's own h * w positions get its resized table; padding gets zeros (masked anyway)."""
        x = linear(patches, self.patch_embedding)  # (B, N, D)
        N = x.shape[1]
        pos = torch.stack([F.pad(self.positions(h, w), (0, 0, 0, N - h * w)) for h, w in shapes])
        return x + pos  # (B, N, D)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values)  # (B, D, h, w), h = floor(H / P), w = floor(W / P)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), N = h * w, patches in row-major order
        return x + self.positions(h, w)

    def positions(self, h: int, w: int) -> Tensor:
        """The (h * w, D) position table for an h x w grid of patches.

        At the learned grid, the table itself. At any other, resized exactly as transformers'
        `interpolate_pos_encoding=True` resizes it (bicubic, align_corners=False, no antialias, in
        the weights' dtype), so that features at any size equal theirs; timm and big_vision
        resample differently (docs/backbone.md)."""
        table = self.position_embedding.weight  # (g * g, D)
        if (h, w) == (self.grid, self.grid):
            return table
        resize = _resize_positions_naflex if self.naflex else _resize_positions
        if torch.is_grad_enabled():
            return resize(table, self.grid, h, w)  # being trained: the resize is in the graph
        # Inference resizes once per size. An entry holds its source table, storage and version, so
        # loading, casting or updating the weights (an optimizer step is in place) computes anew.
        stamp = (table.data_ptr(), table._version)
        hit = self._resized.get((h, w, table.dtype, table.device))
        if hit is None or hit[0] is not table or hit[1] != stamp:
            hit = (table, stamp, resize(table.detach(), self.grid, h, w))
            self._resized[(h, w, table.dtype, table.device)] = hit
        return hit[2]


def _resize_positions(table: Tensor, g: int, h: int, w: int) -> Tensor:
    """(g * g, D) -> (h * w, D), transformers' SiglipVisionEmbeddings.interpolate_pos_encoding op for op
    (the same permutes feed the same interpolation kernel, so the bits agree)."""
    D = table.shape[-1]
    grid = table.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    return grid.permute(0, 2, 3, 1).reshape(h * w, D)


def _resize_positions_naflex(table: Tensor, g: int, h: int, w: int) -> Tensor:
    """(g * g, D) -> (h * w, D) as SigLIP 2 NaFlex resizes its table to an image's grid: bilinear,
    antialiased when shrinking, align_corners=False, in float32 whatever the weights' dtype, then
    cast back, as transformers' Siglip2VisionEmbeddings computes it."""
    D = table.shape[-1]
    grid = table.float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(h * w, D).to(table.dtype)  # (h * w, D)


def naflex_positions(table: Tensor, g: int, spatial_shapes: Tensor, length: int,
                     antialias: bool = True) -> Tensor:
    """(g * g, D) table, (B, 2) int grids (h, w) -> (B, length, D): each image's first h * w slots
    get the table resized to its grid as _resize_positions_naflex resizes it, the padding slots the
    image's first position again (as transformers fills them; masked anyway), with no grid size read
    as a Python int: the form an exported graph with dynamic B and N computes.

    A bilinear resize is separable and linear, so output row r of an image with h rows is a weighted
    sum of the g table rows, weights from h as a tensor. aten's upsample_bilinear2d_aa (align_corners
    False): scale = g / h, centre (r + 0.5) * scale, a triangle filter whose support is widened to
    `scale` when shrinking (antialias; 1 otherwise), sampled at each source index + 0.5 and
    normalized over the window; sources outside [0, g) are dropped, which is what clamps it at the
    borders. Then slot n of an image w wide is row r = n // w, column c = n % w, and its position
    is sum_a sum_b Wh[r, a] * Ww[c, b] * table[a * g + b]: one (B, N, g*g) @ (g*g, D) matmul."""
    n = torch.arange(length, device=spatial_shapes.device)[None, :]  # (1, N)
    h, w = spatial_shapes[:, :1], spatial_shapes[:, 1:]  # (B, 1) each
    own = n < h * w  # (B, N): padding slots take row 0, column 0 (an all-zero window gives 0 / 0)
    row = torch.where(own, n // w, 0)
    col = torch.where(own, n - (n // w) * w, 0)
    source = torch.arange(g, device=spatial_shapes.device, dtype=torch.float32)  # (g,)

    def weights(index: Tensor, size: Tensor) -> Tensor:  # (B, N) output index, (B, 1) size -> (B, N, g)
        scale = g / size.float()  # (B, 1)
        support = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
        centre = (index.float() + 0.5) * scale  # (B, N)
        x = (source + 0.5 - centre[..., None]) / support[..., None]  # (B, N, g)
        wt = (1 - x.abs()).clamp(min=0)
        return wt / wt.sum(-1, keepdim=True)

    Wh, Ww = weights(row, h), weights(col, w)  # (B, N, g) each
    W = (Wh[..., :, None] * Ww[..., None, :]).flatten(-2)  # (B, N, g * g), row-major like the table
    return (W @ table.float()).to(table.dtype)  # (B, N, D)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over all tokens, then an MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.probe = nn.Parameter(torch.empty(1, 1, D))
        # Named like torch.nn.MultiheadAttention, which the checkpoint was converted for: q, k and v
        # projections packed in one (3D, D) matrix.
        self.attention = nn.Module()
        self.attention.in_proj_weight = nn.Parameter(torch.empty(3 * D, D))
        self.attention.in_proj_bias = nn.Parameter(torch.empty(3 * D))
        self.attention.out_proj = nn.Linear(D, D)
        self.layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = MLP(D, cfg.intermediate_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.probe)
        nn.init.xavier_uniform_(self.attention.in_proj_weight)
        nn.init.zeros_(self.attention.in_proj_bias)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, D = x.shape
        H = self.num_heads
        w_q, w_kv = self.attention.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.attention.in_proj_bias.split([D, 2 * D])
        q = F.linear(self.probe, w_q, b_q).view(1, 1, H, D // H).transpose(1, 2)  # (1, H, 1, Dh)
        k, v = F.linear(x, w_kv, b_kv).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        return q.expand(B, -1, -1, -1), k, v

    def attention_weights(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, D) tokens -> (B, H, N): the probe's attention over the tokens, per head (each row
        sums to 1), what forward() averages the values with; zero where `mask` (B, 1, 1, N) is False."""
        q, k, _ = self._qkv(x)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, 1, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)[:, :, 0]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, D) tokens -> (B, D); `mask` (B, 1, 1, N) hides padding keys."""
        D = x.shape[-1]
        q, k, v = self._qkv(x)
        # NaFlex batches: the probe must not pool the padding (transformers #36382).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, Dh)
        B = y.shape[0]
        y = linear(y.transpose(1, 2).reshape(B, 1, D), self.attention.out_proj)
        # No residual around the attention (the probe is not a token); the MLP has one.
        y = y + self.mlp(self.layernorm(y))
        return y[:, 0]  # (B, D)


class VisionTower(nn.Module):
    """SoViT image encoder: patches -> encoder -> LN -> MAP head.

    `num_layers` below the config's builds only the first blocks and no head: a backbone (as
    LLaVA-OneVision runs 26 of so400m's 27 blocks), with `features()` and no pooled embedding."""

    # CPU inference runs a batch one image at a time: the activations of one image stay in cache.
    # A batch of 8 run whole was slower per image than one image at a time in fp32, bf16 and int8
    # (docs/results.md; scripts/benchmark_backbone.py times both). False runs batches whole. It
    # steps aside while gradients are recorded and under autocast, where the plain ops run.
    per_image_on_cpu: bool = True
    # SigLIP 2 NaFlex on CPU: the same loop, each image at its own length, so nothing is computed over
    # padding. Packing the images' tokens into one sequence was measured no faster (scripts/
    # benchmark_naflex.py, docs/results.md: 1% ahead in bf16 and 6% behind in fp32 on an AMX Xeon)
    # and is not worth a path of its own; both beat the masked padded batch.

    def __init__(self, cfg: VisionConfig, num_layers: int | None = None):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Encoder(cfg, num_layers)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        full = num_layers in (None, cfg.num_hidden_layers)
        self.head = MAPHead(cfg) if full else None  # attention pooling, not a projection
        init_weights(self)

    def forward(self, pixel_values: Tensor | NaFlexPixels) -> Tensor:
        """(B, C, H, W) pixels (NaFlex: NaFlexPixels) -> (B, D) pooled embeddings."""
        if self.head is None:
            raise RuntimeError(
                f"this image tower was loaded with vision_layers={len(self.encoder.layers)} of "
                f"{self.config.num_hidden_layers} blocks and so without its pooling head: it has no "
                "pooled embedding. Use image_features(pixel_values, layers=...) for its patch tokens, "
                "or load without vision_layers to use encode_image")
        if self._one_at_a_time(pixel_values):
            # The head too: an image's embedding is then the same bits whatever batch it came in
            # (oneDNN picks other kernels for other batch sizes), which embed's resumable output needs.
            return torch.cat([self(image) for image in self._images(pixel_values)])
        (x,), mask = self._tokens(pixel_values, [len(self.encoder.layers)], norm=True)  # (B, N, D)
        return self.head(x, mask)  # (B, D)

    def _cpu_inference(self, pixel_values: Tensor | NaFlexPixels) -> bool:
        return (self.per_image_on_cpu and pixel_values.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))

    def _one_at_a_time(self, pixel_values: Tensor | NaFlexPixels) -> bool:
        if not self._cpu_inference(pixel_values):
            return False
        if isinstance(pixel_values, NaFlexPixels):
            # Each image at its own length: no attention, MLP or pooling over padding at all.
            padded = not bool(pixel_values.mask.all())
            return len(pixel_values) > 1 or padded
        return pixel_values.ndim == 4 and pixel_values.shape[0] > 1

    @staticmethod
    def _images(pixel_values: Tensor | NaFlexPixels) -> list:
        """The images of a batch, each a batch of one (NaFlex: without its padding)."""
        if isinstance(pixel_values, NaFlexPixels):
            return pixel_values.unpadded()
        return [image[None] for image in pixel_values]

    def _tokens(self, pixel_values: Tensor | NaFlexPixels, depths: list[int],
                norm: bool) -> tuple[list[Tensor], Tensor | None]:
        """The (B, N, D) tokens after each block count in `depths`, and what the attention masks
        with: None, or the (B, 1, 1, N) key mask of a padded NaFlex batch."""
        # Where and in what the tokens live: the position table's, which int8 never releases (a
        # NaFlex patch embedding is a Linear, quantized and its float weight left on the meta device).
        weight = self.embeddings.position_embedding.weight
        mask = None
        if isinstance(pixel_values, NaFlexPixels):
            if not self.config.naflex:
                raise TypeError("these are SigLIP 2 NaFlex patches (NaFlexPixels), but this model takes "
                                "(B, 3, H, W) pixel values of one fixed size: make them with this "
                                "checkpoint's own processor (load() returns it)")
            shapes = self._check_naflex(pixel_values)
            patches = pixel_values.patches.to(weight.device, weight.dtype)  # (B, N, P*P*C)
            x = self.embeddings.patches(patches, shapes)  # (B, N, D)
            if not bool(pixel_values.mask.all()):
                mask = pixel_values.mask.to(weight.device)[:, None, None, :]  # (B, 1, 1, N)
        else:
            self._check_pixels(pixel_values)
            x = self.embeddings(pixel_values.to(weight.dtype))  # (B, N, D)
        kept = {0: x}
        # Blocks past the deepest requested layer are never run.
        for k, y in enumerate(self.encoder.blocks(x, depth=max(depths), mask=mask), start=1):
            if k in depths:
                kept[k] = y
        return [self.post_layernorm(kept[k]) if norm else kept[k] for k in depths], mask

    def _check_pixels(self, pixel_values: Tensor) -> None:
        P, C = self.config.patch_size, self.config.num_channels
        shape = tuple(getattr(pixel_values, "shape", ()))
        if self.config.naflex:
            raise TypeError(f"this SigLIP 2 NaFlex model takes NaFlexPixels (patches, mask and grid "
                            f"sizes) from its processor.images(), got a {type(pixel_values).__name__} "
                            f"of shape {shape}: make the inputs with this checkpoint's own processor "
                            "(load() returns it)")
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != C:
            raise ValueError(f"pixel_values must have shape (B, {C}, H, W), got {shape}; make them "
                             "with processor.images()")
        H, W = pixel_values.shape[2:]
        if H < P or W < P:
            raise ValueError(f"an image of {H}x{W} pixels is smaller than one {P}x{P} patch; "
                             f"images need at least {P} pixels a side")

    def _check_naflex(self, px: NaFlexPixels) -> list[tuple[int, int]]:
        P, C = self.config.patch_size, self.config.num_channels
        if px.patches.shape[2] != P * P * C:
            raise ValueError(f"NaFlex patches of {px.patches.shape[2]} values, but this model's patches "
                             f"are {P}x{P}x{C} = {P * P * C}: make them with this checkpoint's processor")
        shapes = [(h, w) for h, w in px.spatial_shapes.tolist()]
        lengths = px.mask.sum(1).tolist()
        for i, ((h, w), n) in enumerate(zip(shapes, lengths, strict=True)):
            if h < 1 or w < 1 or h * w != n or h * w > px.patches.shape[1] or not bool(px.mask[i, :n].all()):
                raise ValueError(f"NaFlex image {i}: grid {h}x{w} does not match its mask of {n} patches "
                                 f"(an image's own h * w patches come first, then padding)")
        return shapes

    def features(self, pixel_values: Tensor | NaFlexPixels, layers: Sequence[int] = (-1,),
                 norm: bool = True, grid: bool = False) -> tuple[Tensor | list[Tensor], ...]:
        """Patch tokens of the requested layers, see SigLIP.image_features."""
        depths = self._depths(layers)
        naflex = isinstance(pixel_values, NaFlexPixels)
        if naflex and self.config.naflex:
            shapes = self._check_naflex(pixel_values)
            if self._one_at_a_time(pixel_values):
                per_image = [self._tokens(image, depths, norm)[0] for image in pixel_values.unpadded()]
                out = [[image[k][0] for image in per_image] for k in range(len(depths))]  # (n_i, D)
            else:
                batch, _ = self._tokens(pixel_values, depths, norm)
                out = [[x[i, : h * w] for i, (h, w) in enumerate(shapes)] for x in batch]
            if grid:  # (n_i, D) -> (D, h_i, w_i)
                out = [[x.t().reshape(-1, h, w) for x, (h, w) in zip(same_layer, shapes, strict=True)]
                       for same_layer in out]
            return tuple(out)
        if not naflex:
            self._check_pixels(pixel_values)
        if self._one_at_a_time(pixel_values):
            per_image = [self.features(image[None], layers, norm, grid) for image in pixel_values]
            return tuple(torch.cat(same_layer) for same_layer in zip(*per_image, strict=True))
        out, _ = self._tokens(pixel_values, depths, norm)
        if grid:
            B, _, H, W = pixel_values.shape
            P = self.config.patch_size
            out = [x.transpose(1, 2).reshape(B, -1, H // P, W // P) for x in out]  # (B, D, h, w)
        return tuple(out)

    def _depths(self, layers: Sequence[int]) -> list[int]:
        """Layer indices as transformers' hidden_states counts them -> block counts 0..L."""
        L = len(self.encoder.layers)
        if isinstance(layers, int) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of ints, e.g. (-1,), got {layers!r}")
        bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or not -L - 1 <= k <= L]
        if bad:
            raise ValueError(f"layer {bad[0]!r} is out of range: this image tower has {L} blocks, so "
                             f"layers run from 0 (the embeddings) to {L} (the last block), or from "
                             f"{-L - 1} to -1 counting from the end")
        return [k % (L + 1) for k in layers]

    def set_image_size(self, image_size: int) -> None:
        """Make `image_size` the native size, to fine-tune at another resolution: the position table
        is resized once, as at inference, into a new parameter of the new grid."""
        if self.config.naflex:
            raise ValueError("a SigLIP 2 NaFlex model has no one image size: it takes each image at "
                             "its own; choose the sequence length with max_num_patches instead")
        cfg = dataclasses.replace(self.config, image_size=image_size)
        if cfg.grid_size < 1:
            raise ValueError(f"image_size {image_size} is smaller than one {cfg.patch_size} px patch")
        g, table = cfg.grid_size, self.embeddings.position_embedding.weight.detach()
        with torch.no_grad():
            table = _resize_positions(table, self.embeddings.grid, g, g).clone()  # (g * g, D)
        self.embeddings.position_embedding = nn.Embedding(g * g, cfg.hidden_size, _weight=table)
        self.embeddings.grid = g
        self.config = cfg


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


class TextTower(nn.Module):
    """Text encoder: tokens -> encoder -> LN -> last position -> linear projection."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)  # a projection, not pooling
        init_weights(self)

    def forward(self, input_ids: Tensor) -> Tensor:
        max_len = self.config.max_position_embeddings
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= max_len:
            raise ValueError(f"input_ids must have shape (B, L) with L <= {max_len}, got "
                             f"{tuple(input_ids.shape)}; make them with processor.texts()")
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        # SigLIP pools the last position: texts are padded to the full length with EOS, so this
        # token has seen the whole text through bidirectional attention. Only it is needed from the
        # final layer, which saves 5/6 of that layer's work (3% of the tower).
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), last_only=True))  # (B, 1, D)
        return linear(x[:, 0], self.head)


class SigLIP(nn.Module):
    """The two towers and the learned temperature t' and bias b of the sigmoid loss."""

    def __init__(self, cfg: SiglipConfig, towers: tuple[str, ...] = ("vision", "text"),
                 vision_layers: int | None = None):
        super().__init__()
        unknown = set(towers) - {"vision", "text"}
        if unknown or not towers:
            raise ValueError(f"towers must be a non-empty subset of ('vision', 'text'), got {towers!r}")
        L = cfg.vision_config.num_hidden_layers
        if vision_layers is not None and (type(vision_layers) is not int or not 1 <= vision_layers <= L):
            raise ValueError(f"vision_layers must be between 1 and {L} (the image tower's blocks), "
                             f"got {vision_layers!r}")
        self.config = cfg
        self.towers = tuple(t for t in ("vision", "text") if t in towers)
        self.vision_model = VisionTower(cfg.vision_config, vision_layers) if "vision" in towers else None
        self.text_model = TextTower(cfg.text_config) if "text" in towers else None
        self.logit_scale = nn.Parameter(torch.empty(1))  # t' = log t, stored as in the checkpoint
        self.logit_bias = nn.Parameter(torch.empty(1))
        with torch.no_grad():
            # The towers initialised themselves; t' = log 10 and b = -10 are the paper's choice, so
            # that training starts near the heavy imbalance of negatives over positives.
            self.logit_scale.fill_(math.log(10.0))
            self.logit_bias.fill_(-10.0)

    @property
    def precision(self) -> str:
        """What the towers compute in: 'int8' once quantize_int8() prepared the linear layers, else
        their parameters' dtype. Not t' and b: every load keeps those two in float32, so a bf16
        model's first parameter says float32 (and a label cache keyed by it mixed bf16 and fp32)."""
        if any(getattr(m, "int8", None) is not None for m in self.modules()):
            return "int8"
        tower = self.vision_model if self.vision_model is not None else self.text_model
        return str(next(tower.parameters()).dtype).removeprefix("torch.")

    def _tower(self, name: str) -> nn.Module:
        tower = self.vision_model if name == "vision" else self.text_model
        if tower is None:
            raise RuntimeError(f"the {name} tower was not loaded; load with "
                               f"towers=('vision', 'text') to use it")
        return tower

    def encode_image(self, pixel_values: Tensor | NaFlexPixels, normalize: bool = False) -> Tensor:
        """(B, 3, H, W) pixels from processor.images() -> (B, D) embeddings, on the model's device
        (the pixels are moved there; the tower casts them to its dtype). Any H and W of at least one
        patch: the grid is floor(H / P) x floor(W / P) and the position table is resized.
        SigLIP 2 NaFlex takes the NaFlexPixels its processor.images() makes instead."""
        tower = self._tower("vision")
        x = tower(pixel_values.to(tower.post_layernorm.weight.device))
        return F.normalize(x, dim=-1) if normalize else x

    def image_features(self, pixel_values: Tensor | NaFlexPixels, layers: Sequence[int] = (-1,),
                       norm: bool = True, grid: bool = False) -> tuple[Tensor | list[Tensor], ...]:
        """The image tower as a backbone: (B, 3, H, W) pixels -> one (B, N, D) tensor of patch
        tokens per requested layer, in the order asked (N = h * w, h = floor(H / P), w = floor(W / P)).

        Layer k is transformers' `hidden_states[k]`: 0 the patch embeddings plus positions, k the
        output of block k, negative k counted from the end (-1 the last block, -2 the one before).
        norm=True applies the final LayerNorm to each (so layers=(-1,) is `last_hidden_state`);
        grid=True returns (B, D, h, w) instead. Blocks past the deepest layer asked for are not run.
        SigLIP 2 NaFlex (NaFlexPixels in): each layer is a list of B tensors, image i's own tokens
        (h_i * w_i, D) without padding, or (D, h_i, w_i) with grid=True. See docs/backbone.md."""
        tower = self._tower("vision")
        return tower.features(pixel_values.to(tower.post_layernorm.weight.device), layers, norm, grid)

    def set_image_size(self, image_size: int) -> None:
        """Make `image_size` the image tower's native size (for fine-tuning at it): the position
        table is resized once into a new parameter and the config says the new size."""
        self._tower("vision").set_image_size(image_size)
        self.config = dataclasses.replace(self.config, vision_config=self.vision_model.config)

    def encode_text(self, input_ids: Tensor, normalize: bool = False) -> Tensor:
        """(B, L) token ids from processor.texts() -> (B, D) embeddings, on the model's device."""
        tower = self._tower("text")
        x = tower(input_ids.to(tower.final_layer_norm.weight.device))
        return F.normalize(x, dim=-1) if normalize else x

    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """exp(t') * cos + b for normalized embeddings: (B_img, D), (B_txt, D) -> (B_img, B_txt),
        always in float32 (see match_logits)."""
        return match_logits(image_emb.float() @ text_emb.float().t(), self.logit_scale, self.logit_bias)

    def forward(self, pixel_values: Tensor | NaFlexPixels, input_ids: Tensor) -> Tensor:
        """Logits per image, (B_img, B_txt); a sigmoid of them gives SigLIP's match probabilities."""
        img = self.encode_image(pixel_values, normalize=True)
        txt = self.encode_text(input_ids, normalize=True)
        return self.logits(img, txt)


def match_logits(cos: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float) -> Tensor:
    """SigLIP's logit that an image and a text match, from their cosine: exp(t') * cos + b, in
    float32 whatever the inputs (t ~ 112 amplifies any rounding of the cosines, and thresholds on
    the sigmoid work near 0.5, where a bf16 logit would move the score by points). Its sigmoid is
    the model's probability of a match: the score of a text query's search hits (search, server).
    Differentiable: SigLIP.forward and SigLIP.logits train t' and b through it."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=cos.device)
    bias = torch.as_tensor(logit_bias, dtype=torch.float32, device=cos.device)
    return cos.float() * scale.exp() + bias


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """big_vision's init (as transformers reproduces it) for a tower or any part of one."""
    if next(module.parameters()).is_meta:
        return  # built on the meta device to be loaded: nothing to initialise
    # Generic rules for the leaves first, then the blocks that big_vision initialises their own way.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _lecun_normal(m)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1 / math.sqrt(m.weight.shape[1]))
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Attention):
            for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                nn.init.xavier_uniform_(lin.weight)
        elif isinstance(m, MLP):
            for lin in (m.fc1, m.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        elif isinstance(m, MAPHead):
            m.reset_parameters()


def _embedding(n: int, dim: int) -> nn.Embedding:
    # Handing nn.Embedding its tensor skips its normal_() init: on the meta device that call alone
    # costs 1.5 s (it imports torch's reference decompositions). init_weights() fills it instead.
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


def _lecun_normal(m: nn.Module) -> None:
    # flax's lecun_normal: a normal truncated at two standard deviations, rescaled to keep variance.
    std = math.sqrt(1 / m.weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
