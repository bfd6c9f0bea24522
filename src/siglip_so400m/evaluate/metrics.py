"""The metrics, as clip_benchmark defines them (metrics/zeroshot_classification.py, zeroshot_retrieval.py).

Classification: acc@k is the share of images whose class is among the k best-scored classes; the mean
per-class recall is the top-1 recall of each class averaged over the classes that have images
(sklearn's balanced_accuracy_score, which clip_benchmark calls). Retrieval: a query is a hit at k when
any of its positives is among the k best-scored candidates (text -> image: the caption's image;
image -> text: any of the image's captions); `image_retrieval_recall@k` is the share of text queries
that hit (images are retrieved), `text_retrieval_recall@k` that of image queries.

Ranking uses torch.topk on the cosine similarity, as clip_benchmark does; SigLIP's logit
exp(t')·cos + b is an increasing function of it, so the ranks are those of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ROWS = 4096  # queries scored at a time: (ROWS, candidates) float32 stays small for COCO's 25k captions


def topk(queries: Tensor, candidates: Tensor, k: int) -> Tensor:
    """(Q, D), (C, D) unit vectors -> (Q, min(k, C)) indices of the best candidates, best first."""
    k = min(k, len(candidates))
    return torch.cat([torch.topk(q @ candidates.T, k, dim=1).indices
                      for q in queries.split(ROWS)]) if len(queries) else torch.zeros(0, k, dtype=torch.long)


def classification_metrics(image_emb: Tensor, class_emb: Tensor, targets: Tensor
                           ) -> tuple[dict[str, float], Tensor, list[dict]]:
    """(N, D) images, (C, D) classes, (N,) class indices -> (clip_benchmark's metrics dict
    {acc1, acc5, mean_per_class_recall}, the (N, min(5, C)) top-5 class indices, per-class rows)."""
    top = topk(image_emb, class_emb, 5)  # (N, 5)
    targets = targets.to(top.device)
    hit = top == targets[:, None]  # (N, 5): at most one True per row
    n_classes = len(class_emb)
    count = torch.bincount(targets, minlength=n_classes)
    correct = torch.bincount(targets[hit[:, 0]], minlength=n_classes)
    present = count > 0
    per_class = [{"class": k, "images": int(count[k]), "top1_correct": int(correct[k]),
                  "recall": float(correct[k] / count[k]) if count[k] else None} for k in range(n_classes)]
    # Counts over N in float64, as clip_benchmark's accuracy() and sklearn compute them.
    n = len(targets)
    # Below 5 classes acc@5 is NaN, as clip_benchmark reports it (every image would count).
    metrics = {"acc1": hit[:, 0].sum().item() / n,
               "acc5": hit.any(1).sum().item() / n if n_classes >= 5 else float("nan"),
               "mean_per_class_recall": (correct[present].double() / count[present]).mean().item()}
    return metrics, top, per_class


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_image: Tensor,
                      recall_k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """(I, D) images, (T, D) captions, (T,) the image of each caption -> recall@k both ways."""
    text_image = text_image.to(image_emb.device)
    kmax = max(recall_k)
    t2i = topk(text_emb, image_emb, kmax) == text_image[:, None]  # (T, k): the caption's image found
    own = torch.arange(len(image_emb), device=image_emb.device)[:, None]
    i2t = text_image[topk(image_emb, text_emb, kmax)] == own  # (I, k): one of the image's captions found
    metrics = {}
    for k in recall_k:  # a float32 mean of the hits, as clip_benchmark takes it
        metrics[f"image_retrieval_recall@{k}"] = t2i[:, :k].any(1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = i2t[:, :k].any(1).float().mean().item()
    return metrics
