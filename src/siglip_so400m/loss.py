"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                 logit_bias: Tensor) -> Tensor:
    """-1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), z_ij = 1 on matching pairs, else -1.

    image_emb, text_emb: (B, D) L2-normalized embeddings, row i of each a matching pair.
    logit_scale: the stored log-temperature t' (t = exp(t')); logit_bias: b.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"need two (B, D) embeddings of one shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    logits = image_emb @ text_emb.t() * logit_scale.exp() + logit_bias  # (B, B)
    z = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]
