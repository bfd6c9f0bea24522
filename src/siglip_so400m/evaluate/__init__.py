"""Evaluation: zero-shot accuracy and retrieval recall@k, the numbers a checkpoint or a fine-tune is
judged by, with clip_benchmark's definitions and result JSON.

    siglip-so400m eval zero-shot imagenet/val --classes imagenet1k --templates imagenet --json
    siglip-so400m eval retrieval coco_test.csv --json

    from siglip_so400m import evaluate
    result = evaluate.zero_shot("imagenet/val", model="google/siglip-so400m-patch14-384",
                                classes="imagenet1k", templates="imagenet")
    result["metrics"]  # {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}

inputs.py reads the sets and the shipped ensembles, metrics.py is the metrics alone (tensors in,
numbers out), runner.py embeds and scores, cli.py is `siglip-so400m eval`. See docs/eval.md.
"""

from .inputs import CLASS_LISTS, TEMPLATE_SETS, EvalError, read_classes, read_templates
from .metrics import classification_metrics, retrieval_metrics
from .runner import embed_items, retrieval, zero_shot

__all__ = ["CLASS_LISTS", "TEMPLATE_SETS", "EvalError", "classification_metrics", "embed_items",
           "read_classes", "read_templates", "retrieval", "retrieval_metrics", "zero_shot"]
