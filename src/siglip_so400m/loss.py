"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1), whole, chunked, and across processes.

    L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)),   z_ij = 1 if i == j else -1

Every pair is an independent binary problem, so the loss needs no global view of the batch: a
device can score its own images against any block of texts and add the result up. That is the
paper's "chunked" implementation (section 3.3): images stay on their device while text embeddings
travel around the ring, and each device adds the negative-only terms of the blocks it receives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor


def _block(x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor, diag: bool) -> Tensor:
    """sum over a (b_x, b_y) block of -log sigmoid(z * logits); positives on the diagonal if diag."""
    logits = x @ y.t() * logit_scale.exp() + logit_bias
    if not diag:
        return -F.logsigmoid(-logits).sum()  # all negatives
    z = 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum()


def _check(image_emb: Tensor, text_emb: Tensor, empty_ok: bool = False) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need two (B, D) embeddings of one shape, row i of each a matching pair; got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if not empty_ok and image_emb.shape[0] == 0:
        raise ValueError("the sigmoid loss of an empty batch is undefined (it divides by |B| = 0); "
                         "skip the step or give at least one pair")


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 chunk_size: int | None = None) -> Tensor:
    """The sigmoid loss of one batch.

    image_emb, text_emb: (B, D) L2-normalized embeddings (as `encode_*(normalize=True)` returns
        them), row i of each a matching pair.
    logit_scale: the stored log-temperature t' (t = exp(t')); logit_bias: b.
    chunk_size: score the texts in blocks of this many, recomputing each block in the backward pass,
        so the (B, B) logit matrix never exists whole; same value and gradients.
    """
    _check(image_emb, text_emb)
    B = image_emb.shape[0]
    if chunk_size is None or chunk_size >= B:
        return _block(image_emb, text_emb, logit_scale, logit_bias, diag=True) / B
    total = image_emb.new_zeros(())
    for start in range(0, B, chunk_size):
        end = min(start + chunk_size, B)
        # Positives of this block: the diagonal of rows [start, end) against columns [start, end).
        pos = torch.utils.checkpoint.checkpoint(
            _block, image_emb[start:end], text_emb[start:end], logit_scale, logit_bias, True,
            use_reentrant=False)
        # Negatives: the other rows against these columns.
        rest = torch.cat([image_emb[:start], image_emb[end:]])
        neg = torch.utils.checkpoint.checkpoint(
            _block, rest, text_emb[start:end], logit_scale, logit_bias, False, use_reentrant=False)
        total = total + pos + neg
    return total / B


class _Exchange(torch.autograd.Function):
    """Send tensors to some ranks and receive tensors from others in one batch of point-to-point
    operations. Its backward pass sends each gradient back the way its tensor came."""

    @staticmethod
    def forward(ctx, group, routes, *tensors):  # routes: one (dst, src, received shape) per tensor
        ctx.group, ctx.routes = group, routes
        ctx.shapes = [t.shape for t in tensors]
        items = [(t, dst, src, shape) for t, (dst, src, shape) in zip(tensors, routes, strict=True)]
        return tuple(_p2p(items, group))

    @staticmethod
    def backward(ctx, *grads):
        back = [(g.contiguous(), src, dst, shape)
                for g, (dst, src, _), shape in zip(grads, ctx.routes, ctx.shapes, strict=True)]
        return None, None, *_p2p(back, ctx.group)


def _p2p(items: list[tuple[Tensor, int, int, torch.Size]], group) -> list[Tensor]:
    """Each item: send its tensor to global rank dst, receive a tensor of `shape` from src."""
    ops, received = [], []
    for tensor, dst, src, shape in items:
        buf = tensor.new_empty(shape)
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), dst, group))
        ops.append(dist.P2POp(dist.irecv, buf, src, group))
        received.append(buf)
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


_loss_groups: tuple[object, object] | None = None  # (the default group it was made in, the group)


def _loss_group(group):
    """A process group of its own for the exchange, so that its point-to-point traffic never
    interleaves with DDP's gradient all-reduce, which starts while the loss is still backpropagating.
    Made again when the default group changes (destroy_process_group() and a new init): the old
    one is destroyed with it."""
    global _loss_groups
    if group is not None:
        return group
    world = dist.group.WORLD
    if _loss_groups is None or _loss_groups[0] is not world:
        _loss_groups = (world, dist.new_group(list(range(dist.get_world_size()))))
    return _loss_groups[1]


def distributed_sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                             logit_bias: Tensor, group=None) -> Tensor:
    """The global-batch sigmoid loss, each rank passing its local batch (sizes may differ).

    Images stay on their rank; text embeddings go around the ring in both directions, and each rank
    adds the negative-only terms of the blocks it receives. Gradients flow back through the exchange
    to the rank that owns each text. Each rank returns W/|B| times the sum of its images' terms (W
    ranks, |B| the global batch), so the mean over ranks is the global loss and DDP's averaging of
    gradients gives exactly the global-batch gradients.
    """
    if not dist.is_available() or not dist.is_initialized():
        return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias)
    _check(image_emb, text_emb, empty_ok=True)  # a rank may have no pairs; the global batch may not
    group = _loss_group(group)
    W = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # Every rank's batch size, to size the buffers (and the global |B|).
    sizes = torch.tensor([image_emb.shape[0]], dtype=torch.long, device=image_emb.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(W)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = [int(s) for s in all_sizes]
    B, D = sum(all_sizes), text_emb.shape[1]
    if B == 0:  # every rank sees the same sizes, so every rank raises
        raise ValueError("the sigmoid loss of an empty global batch is undefined: no rank has a pair")

    def peer(offset: int) -> int:
        return dist.get_global_rank(group, (rank + offset) % W)

    total = _block(image_emb, text_emb, logit_scale, logit_bias, diag=True)
    from_left = from_right = text_emb  # after step k: the texts of rank - k and of rank + k
    for k in range(1, W // 2 + 1):
        left_shape = (all_sizes[(rank - k) % W], D)
        if 2 * k == W:  # the rank opposite: one direction reaches it
            (from_left,) = _Exchange.apply(group, [(peer(1), peer(-1), left_shape)], from_left)
            total = total + _block(image_emb, from_left, logit_scale, logit_bias, diag=False)
            break
        right_shape = (all_sizes[(rank + k) % W], D)
        from_left, from_right = _Exchange.apply(
            group, [(peer(1), peer(-1), left_shape), (peer(-1), peer(1), right_shape)], from_left, from_right)
        total = total + _block(image_emb, from_left, logit_scale, logit_bias, diag=False)
        total = total + _block(image_emb, from_right, logit_scale, logit_bias, diag=False)
    return total * W / B
