"""`siglip-so400m convert model.npz OUT_DIR`: a big_vision SigLIP checkpoint written in the Hugging Face
Hub layout (config.json, model.safetensors, tokenizer and preprocessor files), so that a big_vision
fine-tune loads in transformers (`SiglipModel`, `AutoProcessor`, the zero-shot pipeline) and in
`siglip_so400m.load` with the same outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .api import Processor
from .model import SigLIP
from .text import GemmaTokenizer, Tokenizer
from .weights import CheckpointError, load_weights, resolve

# What Google's conversions wrote beside the weights (see docs/checkpoints.md for the sources).
_SIGLIP_TOKENIZER_CONFIG = {
    "tokenizer_class": "SiglipTokenizer", "do_lower_case": True, "eos_token": "</s>", "pad_token": "</s>",
    "unk_token": "<unk>", "model_input_names": ["input_ids"], "processor_class": "SiglipProcessor"}
_GEMMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True,
    "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    "padding_side": "right", "model_input_names": ["input_ids"], "processor_class": "SiglipProcessor"}
BICUBIC, BILINEAR = 3, 2


def convert(npz: str | Path, out: str | Path, *, config: str | Path | None = None,
            tokenizer: str | Path | None = None, resample: int | None = None) -> Path:
    """Write `npz` (a big_vision SigLIP .npz) to `out` in the Hub layout; returns `out`.

    config: a config.json for the weights (default: inferred from the array shapes).
    tokenizer: its tokenizer file (default: spiece.model, tokenizer.json or tokenizer.model beside it).
    resample: the PIL resize filter for preprocessor_config.json (default: bilinear (2) with the
        Gemma tokenizer, as SigLIP 2 was trained; bicubic (3) otherwise, as SigLIP was).
    """
    npz, out = Path(npz), Path(out)
    if npz.suffix != ".npz":
        raise CheckpointError(f"{npz}: expected a big_vision .npz checkpoint")
    if not npz.is_file():  # resolve() would add "and not a Hub id", which no .npz is
        raise CheckpointError(f"{npz}: no such file" + (" (it is a folder)" if npz.is_dir() else ""))
    ckpt = resolve(npz, config=config)
    with torch.device("meta"):
        model = SigLIP(ckpt.config)
    load_weights(model, ckpt, dtype=torch.float32)
    tok = Processor.from_checkpoint(ckpt, tokenizer).tokenizer
    if tok is None:
        raise CheckpointError(f"no tokenizer beside {npz} (spiece.model, tokenizer.json or tokenizer.model): "
                              "pass it with --tokenizer FILE")
    out.mkdir(parents=True, exist_ok=True)
    config_json = {"architectures": [ckpt.config.architecture], **ckpt.config.to_dict()}
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    L = ckpt.config.text_config.max_position_embeddings
    if isinstance(tok, GemmaTokenizer):
        files = [tok.path] + [tok.path.with_name(n) for n in ("tokenizer.json", "tokenizer.model")
                              if tok.path.with_name(n).is_file() and tok.path.name != n]
        for f in files:
            target = "tokenizer.json" if f.suffix == ".json" else "tokenizer.model"
            _copy(f, out / target)
        tok_cfg = {**_GEMMA_TOKENIZER_CONFIG, "model_max_length": L}
        default_resample = BILINEAR
    else:
        assert isinstance(tok, Tokenizer)
        _copy(tok.path, out / "spiece.model")
        tok_cfg = {**_SIGLIP_TOKENIZER_CONFIG, "model_max_length": L}
        default_resample = BICUBIC
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    S = ckpt.config.vision_config.image_size
    pre = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
           "do_convert_rgb": True, "do_resize": True, "size": {"height": S, "width": S},
           "resample": default_resample if resample is None else resample, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
           "image_std": [0.5, 0.5, 0.5]}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


def _copy(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


def convert_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Write a big_vision SigLIP .npz in the Hugging Face "
                                "Hub layout, for transformers and siglip_so400m.load.")
    p.add_argument("npz", type=Path, nargs="?", help="the big_vision checkpoint (per-layer or stacked "
                   "encoderblock)")
    p.add_argument("out", type=Path, nargs="?", help="output folder")
    # The model and the output as every other command names them (--model, --output / -o).
    p.add_argument("--model", dest="model_flag", type=Path, metavar="NPZ", help="the same as NPZ")
    p.add_argument("--output", "-o", dest="output_flag", type=Path, metavar="DIR", help="the same as OUT")
    p.add_argument("--config", type=Path, help="config.json for the weights (default: inferred from shapes)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer file (default: the one beside the .npz)")
    p.add_argument("--resample", type=int, choices=(2, 3), help="PIL resize filter: 2 bilinear, 3 bicubic "
                   "(default: 2 with the Gemma tokenizer (SigLIP 2), else 3)")
    args = p.parse_args(argv)
    given = (("model", "NPZ", args.npz, args.model_flag), ("output", "OUT", args.out, args.output_flag))
    for what, name, positional, flag in given:
        if positional and flag and positional != flag:
            p.error(f"two {what}s given: {positional} and --{what} {flag}; give one")
        if not (positional or flag):
            p.error(f"give the {what}: {name} or --{what} {name}")
    try:
        out = convert(args.model_flag or args.npz, args.output_flag or args.out, config=args.config,
                      tokenizer=args.tokenizer,
                      resample=args.resample)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
