"""The user-facing entry point: `load()` a checkpoint into a model and its matching processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import SiglipConfig
from .image import ImageInput, ImageProcessor
from .model import SigLIP
from .text import Tokenizer
from .weights import DEFAULT_REPO, Checkpoint, CheckpointError, load_weights, resolve


class Processor:
    """Images and texts -> the tensors the towers take, with the checkpoint's own settings."""

    def __init__(self, image: ImageProcessor, tokenizer: Tokenizer | None, source: str = ""):
        self.image = image
        self.tokenizer = tokenizer
        self._source = source

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Processor:
        cfg = ckpt.config
        folder = ckpt.folder
        pre = folder / "preprocessor_config.json" if folder else None
        image_cfg = json.loads(pre.read_text()) if pre and pre.is_file() else {}
        image = ImageProcessor.from_dict(image_cfg, cfg.vision_config.image_size)
        S = cfg.vision_config.image_size
        if (image.height, image.width) != (S, S):
            raise CheckpointError(f"preprocessor_config.json resizes to {image.height}x{image.width} "
                                  f"but the model takes {S}x{S} images")
        tokenizer = None
        if folder and (folder / "spiece.model").is_file():
            tokenizer = Tokenizer.from_folder(folder, max_length=cfg.text_config.max_position_embeddings)
        return cls(image, tokenizer, ckpt.name)

    def images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """PIL images, paths or uint8 arrays -> (B, 3, S, S) float32 pixel values."""
        return self.image(images)

    def texts(self, texts: str | list[str]) -> torch.Tensor:
        """Strings -> (B, 64) int64 token ids, padded with EOS as SigLIP was trained."""
        if self.tokenizer is None:
            raise RuntimeError(f"no spiece.model came with the checkpoint {self._source}, so texts "
                               "cannot be tokenized; load a folder or Hub id that has it")
        return self.tokenizer(texts)


def load(name: str | Path = DEFAULT_REPO, *, revision: str | None = None,
         dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         towers: tuple[str, ...] = ("vision", "text"),
         config: SiglipConfig | str | Path | None = None) -> tuple[SigLIP, Processor]:
    """Load a SigLIP checkpoint and its processor.

    name: a Hub id (default google/siglip-so400m-patch14-384), a local folder in the Hub layout, or a
        .safetensors file (its config from `config=` or a config.json beside it).
    revision: a Hub branch, tag or commit. dtype: e.g. torch.bfloat16 (default: float32).
    device: where the weights go (default CPU). towers: ("vision",) or ("text",) loads one tower
        only; the other one's weights are never read.
    """
    if isinstance(towers, str):
        towers = (towers,)
    ckpt = resolve(name, revision=revision, config=config, towers=towers)
    with torch.device("meta"):
        model = SigLIP(ckpt.config, towers=towers)
    load_weights(model, ckpt, dtype=dtype or torch.float32, device=device)
    model.eval()
    model.checkpoint = ckpt
    return model, Processor.from_checkpoint(ckpt)
