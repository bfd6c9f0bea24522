"""SigLIP So400m/14 @ 384 px in plain PyTorch: numerically identical to transformers' SiglipModel.

    import siglip_so400m
    model, processor = siglip_so400m.load("google/siglip-so400m-patch14-384")
    logits = model(processor.images(["cat.jpg"]), processor.texts(["a photo of 2 cats"]))
"""

from .api import Processor, load
from .attention_maps import attention_map
from .config import SiglipConfig, TextConfig, VisionConfig
from .convert import convert
from .image import ImageProcessor, ImageReadError, load_image
from .loss import distributed_sigmoid_loss, sigmoid_loss
from .model import SigLIP, TextTower, VisionTower
from .text import GemmaTokenizer, Tokenizer
from .weights import DEFAULT_REPO, Checkpoint, CheckpointError
from .zeroshot import ZeroShotClassifier, zero_shot

__all__ = [
    "DEFAULT_REPO",
    "Checkpoint",
    "CheckpointError",
    "GemmaTokenizer",
    "ImageProcessor",
    "ImageReadError",
    "Index",
    "Processor",
    "SigLIP",
    "SiglipConfig",
    "TextConfig",
    "TextTower",
    "Tokenizer",
    "VisionConfig",
    "VisionTower",
    "ZeroShotClassifier",
    "attention_map",
    "convert",
    "distributed_sigmoid_loss",
    "embed",
    "export",
    "load",
    "load_image",
    "sigmoid_loss",
    "zero_shot",
]


def __getattr__(name: str):
    # The collection jobs need pyarrow and faiss (extras [embed], [search]), export onnx and openvino
    # ([export]): import them on first use so that `import siglip_so400m` never does.
    if name == "export":  # the module is `exporting`: a module `export` would shadow this function
        from .exporting import export

        return export
    if name == "embed":
        from .embedding import embed

        return embed
    if name == "evaluate":  # siglip_so400m.evaluate.zero_shot(...) without importing it first
        import importlib

        return importlib.import_module(".evaluate", __name__)
    if name == "Index":
        from .search import Index

        return Index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
