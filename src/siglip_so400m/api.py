"""The user-facing entry point: `load()` a checkpoint into a model and its matching processor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import autotune
from .config import SiglipConfig
from .image import ImageInput, ImageProcessor, NaFlexImageProcessor, NaFlexPixels
from .int8 import quantize_int8
from .model import SigLIP
from .text import AnyTokenizer, load_tokenizer, tokenizer_from_file
from .weights import DEFAULT_REPO, Checkpoint, CheckpointError, load_weights, resolve


class Processor:
    """Images and texts -> the tensors the towers take, with the checkpoint's own settings."""

    def __init__(self, image: ImageProcessor | NaFlexImageProcessor, tokenizer: AnyTokenizer | None,
                 source: str = ""):
        self.image = image
        self.tokenizer = tokenizer
        self._source = source

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, tokenizer: str | Path | None = None) -> Processor:
        """The checkpoint's own preprocessing; `tokenizer` (a tokenizer.json or SentencePiece .model)
        replaces the tokenizer files of its folder, e.g. for a big_vision .npz."""
        cfg = ckpt.config
        folder = ckpt.folder
        pre = folder / "preprocessor_config.json" if folder else None
        image_cfg = json.loads(pre.read_text()) if pre and pre.is_file() else {}
        try:
            image = _image_processor(cfg, image_cfg)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        L = cfg.text_config.max_position_embeddings
        try:
            if tokenizer is not None:
                tok = tokenizer_from_file(tokenizer, L)
            else:
                tok = load_tokenizer(folder, L) if folder else None
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if tok is not None and tok.vocab_size > cfg.text_config.vocab_size:
            raise CheckpointError(
                f"the tokenizer ({getattr(tok, 'path', '')}) has {tok.vocab_size} tokens but the text "
                f"embedding table has {cfg.text_config.vocab_size} rows: this tokenizer belongs to "
                "another checkpoint (pass the one the model was trained with)")
        return cls(image, tok, ckpt.name)

    def images(self, images: ImageInput | list[ImageInput], size: int | tuple[int, int] | None = None,
               max_num_patches: int | None = None) -> torch.Tensor | NaFlexPixels:
        """PIL images, paths or uint8 arrays -> (B, 3, H, W) float32 pixel values, at the
        checkpoint's own size, or at `size` (one side, or (height, width)) for the image tower at
        another resolution. SigLIP 2 NaFlex: NaFlexPixels (patches, mask, grid sizes), each image
        at its aspect ratio within `max_num_patches` patches (default: preprocessor_config.json's)."""
        return self.at_size(size, max_num_patches)(images)

    def at_size(self, size: int | tuple[int, int] | None,
                max_num_patches: int | None = None) -> ImageProcessor | NaFlexImageProcessor:
        """The image processor resizing to `size` (one side, or (height, width)), or for NaFlex
        within `max_num_patches`; None: its own."""
        if isinstance(self.image, NaFlexImageProcessor):
            if size is not None:
                raise ValueError("a SigLIP 2 NaFlex checkpoint takes each image at its own aspect "
                                 "ratio, not at one size: pass max_num_patches (--max-num-patches) "
                                 "instead of size (--image-size)")
            if max_num_patches is None:
                return self.image
            return dataclasses.replace(self.image, max_num_patches=max_num_patches)
        if max_num_patches is not None:
            raise ValueError("max_num_patches (--max-num-patches) applies to SigLIP 2 NaFlex "
                             "checkpoints; this one takes images of one size (pass size / --image-size)")
        if size is None:
            return self.image
        H, W = (size, size) if isinstance(size, int) else size
        if not (isinstance(H, int) and isinstance(W, int) and H > 0 and W > 0):
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        return dataclasses.replace(self.image, height=H, width=W)

    def sized(self, size: int | tuple[int, int] | None = None,
              max_num_patches: int | None = None) -> Processor:
        """A new processor whose images are resized to `size`, or for NaFlex within
        `max_num_patches` patches (see at_size); this one is left as it is."""
        return Processor(self.at_size(size, max_num_patches), self.tokenizer, self._source)

    def image_record(self) -> dict:
        """What decides the image embeddings beside the weights, as stored outputs record it: the
        fixed size (image_size, [H, W] when not square), or SigLIP 2 NaFlex's patch budget."""
        if isinstance(self.image, NaFlexImageProcessor):
            return {"max_num_patches": self.image.max_num_patches}
        H, W = self.image.height, self.image.width
        return {"image_size": H if H == W else [H, W], "max_num_patches": None}

    def texts(self, texts: str | list[str]) -> torch.Tensor:
        """Strings -> (B, L) int64 token ids, padded as the checkpoint was trained (L = 64 or 16)."""
        if self.tokenizer is None:
            raise RuntimeError(f"no spiece.model, tokenizer.json or tokenizer.model came with the "
                               f"checkpoint {self._source}, so texts cannot be tokenized; load a folder "
                               "or Hub id that has one, or pass load(..., tokenizer=FILE)")
        return self.tokenizer(texts)


def _image_processor(cfg: SiglipConfig, d: dict) -> ImageProcessor | NaFlexImageProcessor:
    """The image processor preprocessor_config.json describes, checked against the model config."""
    vision = cfg.vision_config
    if vision.naflex:
        if "size" in d or d.get("image_processor_type", "Siglip2").startswith("SiglipImage"):
            raise ValueError("the model is SigLIP 2 NaFlex (config.json model_type 'siglip2') but "
                             "preprocessor_config.json is a fixed-size SigLIP image processor's; a "
                             "NaFlex one has max_num_patches")
        image = NaFlexImageProcessor.from_dict(d, vision.patch_size)
        if image.patch_size != vision.patch_size:
            raise ValueError(f"preprocessor_config.json cuts {image.patch_size} px patches, but the "
                             f"model's are {vision.patch_size} px")
        return image
    if "max_num_patches" in d:
        raise ValueError("preprocessor_config.json is a SigLIP 2 NaFlex image processor's "
                         "(max_num_patches), but config.json describes a fixed-size model")
    image = ImageProcessor.from_dict(d, vision.image_size)
    S = vision.image_size
    if (image.height, image.width) != (S, S):
        raise ValueError(f"preprocessor_config.json resizes to {image.height}x{image.width} but the "
                         f"model takes {S}x{S} images")
    return image


def load(name: str | Path | Checkpoint = DEFAULT_REPO, *, revision: str | None = None,
         dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         towers: tuple[str, ...] = ("vision", "text"),
         config: SiglipConfig | str | Path | None = None,
         quantize: str | None = None, vision_layers: int | None = None,
         tokenizer: str | Path | None = None) -> tuple[SigLIP, Processor]:
    """Load a SigLIP checkpoint and its processor.

    name: a Hub id (default google/siglip-so400m-patch14-384; every SoViT-400m SigLIP and SigLIP 2
        checkpoint in docs/checkpoints.md), a local folder in the Hub layout, a .safetensors file
        (its config from `config=` or a config.json beside it), a big_vision .npz (its config from
        `config=` or inferred from the array shapes), or a Checkpoint that `weights.resolve` found.
    revision: a Hub branch, tag or commit. dtype: e.g. torch.bfloat16 (default: float32).
    device: where the weights go (default CPU). towers: ("vision",) or ("text",) loads one tower
        only; the other one's weights are never read.
    tokenizer: a tokenizer.json or SentencePiece .model to use instead of the checkpoint folder's
        (for a big_vision .npz whose tokenizer lies elsewhere).
    quantize: "int8" turns the linear layers into int8 matmuls for CPU inference (weights per output
        channel, activations per row, quantized on the fly; see int8.py), with embeddings at cosine
        >= 0.99 to fp32. The rest runs in `dtype`, by default float32, as `--dtype int8` means in
        every command. The model is then for inference only (the linear layers' float weights are
        released); quantizing costs a few seconds at load.
    vision_layers: build only the image tower's first N blocks and no pooling head, a backbone for
        image_features() (LLaVA-OneVision runs 26 of so400m's 27); the dropped blocks' and the
        head's weights are never read, and encode_image is refused.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"quantize='int8' runs the other layers in float32 or bfloat16, not {dtype}")
    if quantize and torch.device(device or "cpu").type != "cpu":
        raise ValueError(f"quantize='int8' runs on the CPU only (its kernels are oneDNN's), not on "
                         f"{device}; load with device='cpu', or use dtype=torch.bfloat16 on {device}")
    if isinstance(towers, str):
        towers = (towers,)
    ckpt = name if isinstance(name, Checkpoint) else resolve(name, revision=revision, config=config,
                                                              towers=towers)
    with torch.device("meta"):
        model = SigLIP(ckpt.config, towers=towers, vision_layers=vision_layers)
    # int8 quantizes from the float32 weights, then moves the remaining parameters to its dtype.
    load_weights(model, ckpt, dtype=torch.float32 if quantize else dtype or torch.float32, device=device)
    if quantize:
        quantize_int8(model, dtype or torch.float32)
    model.eval()
    model.checkpoint = ckpt
    return model, Processor.from_checkpoint(ckpt, tokenizer)


def pick_device(device: str | None = None) -> torch.device:
    """'auto' (or None) -> cuda if available, then mps, else cpu."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """The fast inference dtype for a device: bf16 where the hardware computes it natively (CUDA
    from sm_80, Ampere, on; x86 CPUs with AVX512-BF16 or AMX where a bf16 matmul measured faster than
    a float32 one), fp16 on older GPUs (T4, V100), float32 elsewhere. bf16 embeddings keep a cosine
    similarity above 0.999 to fp32; pass float32 for exact transformers parity."""
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported() alone counts emulation, which is slow (T4, V100); and it
        # speaks of the current device, so the target's own compute capability decides.
        index = device.index if device.index is not None else torch.cuda.current_device()
        native = torch.cuda.get_device_capability(index)[0] >= 8 \
            and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16() and _bf16_measured_faster():
        return torch.bfloat16
    return torch.float32


def _bf16_measured_faster() -> bool:
    """Whether a bf16 matmul at the image MLP's shape (729 x 1152 -> 4304) measured faster than a
    float32 one on this machine (autotune.py: once per machine, then read from the cache file).
    Only asked where the CPU has bf16 instructions: elsewhere torch emulates bf16 many times slower,
    and measuring it would cost seconds for nothing."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(729, 1152, generator=g), torch.randn(4304, 1152, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.inference_mode():
        return autotune.choose("dtype auto: float32 or bfloat16 at 729x1152x4304",
                               {"float32": lambda: F.linear(x, w), "bfloat16": lambda: F.linear(xb, wb)},
                               "float32") == "bfloat16"


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: be conservative, bf16 may be emulated and slow
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
