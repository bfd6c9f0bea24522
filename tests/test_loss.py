"""The sigmoid loss: the paper's formula, the chunked form, and the loss across processes, in value
and in gradient, against the single-process global loss in float64."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from siglip_so400m import distributed_sigmoid_loss, sigmoid_loss


def embeddings(B: int, D: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    # Make the matching pairs similar, so positives and negatives both matter.
    y = torch.nn.functional.normalize(y + 2 * x, dim=-1)
    t = torch.tensor(math.log(10.0), dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64)
    return x, y, t, b


def loss_and_grads(fn, x, y, t, b, **kw):
    x, y, t, b = (v.clone().requires_grad_(True) for v in (x, y, t, b))
    loss = fn(x, y, t, b, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, t.grad, b.grad


def test_loss_is_the_papers_formula():
    x, y, t, b = embeddings(5)
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = math.exp(t) * float(x[i] @ y[j]) + float(b)
            total += math.log(1 / (1 + math.exp(-z * logit)))
    assert sigmoid_loss(x, y, t, b).item() == pytest.approx(-total / 5, rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_chunked_loss_equals_the_plain_one_in_value_and_gradient(chunk_size):
    x, y, t, b = embeddings(10)
    ref = loss_and_grads(sigmoid_loss, x, y, t, b)
    got = loss_and_grads(sigmoid_loss, x, y, t, b, chunk_size=chunk_size)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_chunked_loss_never_builds_the_whole_logit_matrix():
    x, y, t, b = embeddings(64)
    sizes = []

    def spy(x_, y_, *a, **k):
        sizes.append((x_.shape[0], y_.shape[0]))
        return real(x_, y_, *a, **k)

    import siglip_so400m.loss as L

    real, L._block = L._block, spy
    try:
        loss_and_grads(sigmoid_loss, x, y, t, b, chunk_size=8)
    finally:
        L._block = real
    assert sizes and max(r * c for r, c in sizes) <= 64 * 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: list[int], out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, t, b = embeddings(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        loss, gx, gy, gt, gb = loss_and_grads(distributed_sigmoid_loss, x[lo:hi], y[lo:hi], t, b)
        out[rank] = (loss, gx, gy, gt, gb)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[4, 4], [3, 6], [2, 4, 3], [1, 5, 2, 3]], ids=str)
def test_distributed_loss_equals_the_global_loss_in_value_and_gradient(sizes):
    """Each rank gets its slice of one global batch. The mean of the ranks' losses is the global
    loss; each rank's gradient for its own embeddings is W times the global one (so that DDP's
    averaging over W ranks gives the global gradient), and the mean of the ranks' gradients for
    logit_scale and logit_bias is the global one."""
    world = len(sizes)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), sizes, out), nprocs=world, join=True)
        results = [out[r] for r in range(world)]
    x, y, t, b = embeddings(sum(sizes))
    loss, gx, gy, gt, gb = loss_and_grads(sigmoid_loss, x, y, t, b)
    tol = dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sum(r[0] for r in results) / world, loss, **tol)
    torch.testing.assert_close(torch.cat([r[1] for r in results]) / world, gx, **tol)
    torch.testing.assert_close(torch.cat([r[2] for r in results]) / world, gy, **tol)
    torch.testing.assert_close(sum(r[3] for r in results) / world, gt, **tol)
    torch.testing.assert_close(sum(r[4] for r in results) / world, gb, **tol)


def test_without_a_process_group_the_distributed_loss_is_the_plain_one():
    x, y, t, b = embeddings(6)
    for r, g in zip(loss_and_grads(sigmoid_loss, x, y, t, b),
                    loss_and_grads(distributed_sigmoid_loss, x, y, t, b), strict=True):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_mismatched_embeddings_are_refused():
    x, y, t, b = embeddings(4)
    with pytest.raises(ValueError, match="matching pair"):
        sigmoid_loss(x, y[:3], t, b)


def test_an_empty_batch_is_refused_instead_of_giving_nan():
    x, y, t, b = embeddings(3)
    with pytest.raises(ValueError, match="empty batch"):
        sigmoid_loss(x[:0], y[:0], t, b)
    with pytest.raises(ValueError, match="empty batch"):
        sigmoid_loss(x[:0], y[:0], t, b, chunk_size=2)


@pytest.mark.parametrize("sizes", [[0, 4], [3, 0, 2], [2, 0, 0, 3]], ids=str)
def test_distributed_loss_with_a_rank_without_pairs_equals_the_global_loss(sizes):
    test_distributed_loss_equals_the_global_loss_in_value_and_gradient(sizes)


def _reinit_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1")
    results = []
    for attempt in range(2):  # a second init after destroy_process_group(), as a notebook may do
        os.environ["MASTER_PORT"] = str(port + attempt)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            x, y, t, b = embeddings(4 * world)
            lo, hi = 4 * rank, 4 * (rank + 1)
            results.append(distributed_sigmoid_loss(x[lo:hi], y[lo:hi], t, b).item())
        finally:
            dist.destroy_process_group()
    out[rank] = results


def test_the_loss_group_is_made_again_after_a_new_process_group():
    world, port = 2, free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        ctx = mp.start_processes(_reinit_worker, args=(world, port, out), nprocs=world, join=False)
        for p in ctx.processes:
            p.join(timeout=120)
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "the second run hung on the destroyed group"
        assert all(p.exitcode == 0 for p in ctx.processes)
        results = [out[r] for r in range(world)]
    x, y, t, b = embeddings(4 * world)
    want = sigmoid_loss(x, y, t, b).item()
    for first, second in results:
        assert first == second
    assert sum(r[1] for r in results) / world == pytest.approx(want, rel=1e-12)
