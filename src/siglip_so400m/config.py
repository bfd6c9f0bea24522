"""SigLIP configuration: frozen dataclasses whose field names are the Hugging Face `config.json` keys.

No torch import here, so a config can be read and checked without loading the framework.

The field defaults are `transformers`' own SiglipConfig defaults (the siglip-base shape). They exist
only so that a sparse Hub `config.json` (google/siglip-so400m-patch14-384 lists just the fields that
differ from base) reads to the same config as our fully explicit `configs/*.json` (shipped in the
package, `siglip_so400m.config.CONFIGS`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# t' and b: every load keeps them in float32 whatever the dtype, and logits are computed from them in
# float32 (model.match_logits). The one statement of why: in bf16, t = exp(t') ~ 112 would move by up
# to 1.6% and b ~ -16.5 by 0.03, and t amplifies any rounding of the cosines, which shifts sigmoid
# scores near 0.5 (where thresholds work) by points. Here, not in weights.py, so that the int8 mode
# can use it without importing the loader (which imports the model, which imports the kernels).
FP32_KEYS = ("logit_scale", "logit_bias")

# Every command's --dtype: the names and short aliases it takes, each to its torch dtype's name.
# "auto" (None) is api.pick_dtype's choice for the device; "int8" is load(quantize="int8").
DTYPES: dict[str, str | None] = {
    "auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "int8": "int8"}

DEFAULT_TEMPLATE = "This is a photo of {}."  # the zero-shot prompt: transformers' pipeline default


def dtype_name(name: str) -> str | None:
    """A --dtype value (any case, alias or not) -> 'float32', 'bfloat16', 'float16', 'int8', or None
    for 'auto'."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


# Keys that transformers writes into every config.json (bookkeeping, generation and task settings of
# its generic PretrainedConfig; transformers 4 wrote pad/bos/eos_token_id into the vision_config
# too). They say nothing about the SigLIP architecture, so we accept and
# ignore them; any other unknown key is an error, since it probably means a typo or another model.
HF_BOOKKEEPING_KEYS = frozenset(
    """
    _attn_implementation _attn_implementation_autoset _commit_hash _name_or_path add_cross_attention
    architectures attn_implementation bad_words_ids begin_suppress_tokens chunk_size_feed_forward
    cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample dtype
    early_stopping encoder_no_repeat_ngram_size eos_token_id bos_token_id pad_token_id
    exponential_decay_length_penalty finetuning_task
    forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder label2id
    length_penalty max_length min_length model_type no_repeat_ngram_size num_beam_groups num_beams
    num_labels num_return_sequences output_attentions output_hidden_states output_scores prefix
    problem_type pruned_heads remove_invalid_values repetition_penalty return_dict
    return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature
    tf_legacy_loss tie_encoder_decoder tie_word_embeddings tokenizer_class top_k top_p torch_dtype
    torchscript transformers_version typical_p use_bfloat16 use_cache
    """.split()
)

# Fully explicit configs shipped inside the package (configs/ at the repository root holds a copy).
CONFIGS = Path(__file__).parent / "configs"
SO400M_CONFIG = CONFIGS / "siglip-so400m-patch14-384.json"

# What our implementation computes; a config asking for anything else is refused, not ignored.
GELU_TANH = "gelu_pytorch_tanh"


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config field {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """The image tower (a ViT with a MAP pooling head)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | None = 224  # None for NaFlex, which takes each image at its own size
    patch_size: int = 16
    hidden_act: str = GELU_TANH
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    # SigLIP 2 NaFlex (Siglip2VisionConfig): the rows of the learned position table, a square grid
    # that is resized to each image's own patch grid. None for the fixed-resolution checkpoints.
    num_patches: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "patch_size"):
            _check_int(f"vision_config.{name}", getattr(self, name))
        if self.naflex:
            _check_int("vision_config.num_patches", self.num_patches)
            if self.image_size is not None:
                raise ValueError("vision_config sets both num_patches (NaFlex: each image at its own "
                                 "size) and image_size (one fixed size); a SigLIP 2 NaFlex config has "
                                 "no image_size")
            if math.isqrt(self.num_patches) ** 2 != self.num_patches:
                raise ValueError(f"vision_config.num_patches must be a square (the position table is "
                                 f"a square grid), got {self.num_patches}")
        else:
            _check_int("vision_config.image_size", self.image_size)
        _check_common("vision_config", self)
        if self.vision_use_head is not True:
            raise ValueError("vision_config.vision_use_head must be true: SigLIP pools with the MAP head")

    @property
    def naflex(self) -> bool:
        """SigLIP 2 NaFlex: patches of each image at its own aspect ratio, a Linear patch embedding."""
        return self.num_patches is not None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """The side of the learned position table, g."""
        if self.naflex:
            return math.isqrt(self.num_patches)
        # A "valid" conv: 384 px with 14 px patches gives 27 per side and drops the last 6 pixels.
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table (g * g)."""
        return self.grid_size**2


@dataclass(frozen=True)
class TextConfig:
    """The text tower (a bidirectional transformer pooled at the last token)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = GELU_TANH
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # The token ids are the tokenizer's business (spiece.model / tokenizer_config.json); they are kept
    # so that a config round-trips. bos/eos are transformers' CLIP-inherited defaults, not SigLIP's
    # (SigLIP's EOS is id 1), and the model never reads them.
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    projection_size: int | None = None  # None means hidden_size, as in transformers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            _check_int(f"text_config.{name}", getattr(self, name))
        _check_common("text_config", self)
        if self.projection_size is None:
            object.__setattr__(self, "projection_size", self.hidden_size)
        _check_int("text_config.projection_size", self.projection_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_common(prefix: str, cfg: VisionConfig | TextConfig) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{prefix}.hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act != GELU_TANH:
        raise ValueError(f"{prefix}.hidden_act is {cfg.hidden_act!r}; SigLIP uses {GELU_TANH!r} "
                         "and this implementation supports nothing else")
    if not 0.0 <= cfg.attention_dropout < 1.0:
        raise ValueError(f"{prefix}.attention_dropout must be in [0, 1), got {cfg.attention_dropout}")


@dataclass(frozen=True)
class SiglipConfig:
    """The two towers and the shared settings of a SigLIP checkpoint."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.vision_config.hidden_size != self.text_config.projection_size:
            raise ValueError(
                f"vision_config.hidden_size {self.vision_config.hidden_size} must equal "
                f"text_config.projection_size {self.text_config.projection_size}: both embeddings "
                "live in one space")

    @property
    def embed_dim(self) -> int:
        return self.vision_config.hidden_size

    @property
    def naflex(self) -> bool:
        return self.vision_config.naflex

    @property
    def architecture(self) -> str:
        """The transformers class of config.json's `architectures`: NaFlex is its own model there."""
        return "Siglip2Model" if self.naflex else "SiglipModel"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiglipConfig:
        """Read a Hugging Face style dict (nested vision_config/text_config); unknown keys raise."""
        d = dict(d)
        model_type = d.get("model_type", "siglip")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"config model_type is {model_type!r}, expected 'siglip' or 'siglip2' "
                             "(is this a SigLIP checkpoint?)")
        vision_d = dict(d.pop("vision_config", None) or {})
        if model_type == "siglip2":
            # transformers' Siglip2VisionConfig: no image_size, and num_patches defaults to 256.
            if "image_size" in vision_d:
                raise ValueError("unknown config keys: vision_config.image_size (a siglip2 config "
                                 "takes each image at its own size: it has num_patches instead)")
            vision_d = {"num_patches": 256, **vision_d, "image_size": None}
        elif "num_patches" in vision_d:
            raise ValueError("unknown config keys: vision_config.num_patches (that is a siglip2 "
                             "NaFlex key; its config.json says model_type 'siglip2')")
        vision = _sub_config(VisionConfig, vision_d, "vision_config", model_type)
        text = _sub_config(TextConfig, d.pop("text_config", None) or {}, "text_config", model_type)
        top = {f.name for f in dataclasses.fields(cls)} - {"vision_config", "text_config"}
        _reject_unknown(d, top, "")
        return cls(vision_config=vision, text_config=text,
                   **{k: v for k, v in d.items() if k in top})

    @classmethod
    def from_json(cls, path: str | Path) -> SiglipConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every field explicit, in the Hugging Face layout (what configs/*.json holds)."""
        model_type = "siglip2" if self.naflex else "siglip"
        vision = dataclasses.asdict(self.vision_config)
        # Each family's keys only: transformers' SiglipVisionConfig has no num_patches, and its
        # Siglip2VisionConfig no image_size.
        del vision["image_size" if self.naflex else "num_patches"]
        return {
            "model_type": model_type,
            "initializer_factor": self.initializer_factor,
            "vision_config": {"model_type": _MODEL_TYPES[model_type]["vision_config"], **vision},
            "text_config": {"model_type": _MODEL_TYPES[model_type]["text_config"],
                            **dataclasses.asdict(self.text_config)},
        }


# config.json model_type -> its sub-configs' model_type; "siglip2" is SigLIP 2 NaFlex (the
# fixed-resolution SigLIP 2 checkpoints are "siglip" configs).
_MODEL_TYPES = {
    "siglip": {"vision_config": "siglip_vision_model", "text_config": "siglip_text_model"},
    "siglip2": {"vision_config": "siglip2_vision_model", "text_config": "siglip2_text_model"},
}


def _sub_config(cls: type, d: dict[str, Any], prefix: str, model_type: str = "siglip") -> Any:
    expected = _MODEL_TYPES[model_type][prefix]
    if d.get("model_type", expected) != expected:
        raise ValueError(f"{prefix}.model_type is {d['model_type']!r}, expected {expected!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(d, names, prefix + ".")
    return cls(**{k: v for k, v in d.items() if k in names})


def _reject_unknown(d: dict[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(k for k in d if k not in known and k not in HF_BOOKKEEPING_KEYS)
    if unknown:
        raise ValueError("unknown config keys: " + ", ".join(prefix + k for k in unknown)
                         + " (a typo, or not a SigLIP config?)")
