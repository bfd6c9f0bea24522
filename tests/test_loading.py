"""The loader: every source (folder, shards, bare file, Hub cache) and every refusal, by message."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import siglip_so400m
from siglip_so400m import CheckpointError, SiglipConfig, TextConfig, VisionConfig
from siglip_so400m.testing import SO400M_CONFIG, hub_cache

REPO = "google/siglip-so400m-patch14-384"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def rewrite(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loads_a_local_folder_in_the_hub_layout(tiny_ckpt):
    model, proc = siglip_so400m.load(tiny_ckpt)
    ref = weights(tiny_ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert not model.training
    assert model.checkpoint.revision is None and model.checkpoint.folder == tiny_ckpt
    assert proc.images([torch.zeros(1).numpy().astype("uint8").reshape(1, 1)]).shape == (1, 3, 32, 32)


def test_loads_sharded_checkpoints(tmp_path, tiny_ckpt):
    from transformers import SiglipModel

    SiglipModel.from_pretrained(tiny_ckpt).save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_model(siglip_so400m.load(tmp_path)[0], siglip_so400m.load(tiny_ckpt)[0])


def test_loads_a_bare_safetensors_file_with_a_config(tmp_path, tiny_ckpt):
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="bare weights file: pass its config"):
        siglip_so400m.load(bare)
    model, proc = siglip_so400m.load(bare, config=tiny_ckpt / "config.json")
    assert_same_model(model, siglip_so400m.load(tiny_ckpt)[0])
    with pytest.raises(RuntimeError, match="no spiece.model"):
        proc.texts(["a cat"])


def test_bf16_load_converts_every_tower_tensor_and_keeps_the_logit_params_fp32(tiny_ckpt):
    model, _ = siglip_so400m.load(tiny_ckpt, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {dtypes.pop("logit_scale"), dtypes.pop("logit_bias")} == {torch.float32}
    assert set(dtypes.values()) == {torch.bfloat16}
    ref, _ = siglip_so400m.load(tiny_ckpt)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            model.encode_image(pixels).float(), ref.encode_image(pixels), dim=-1)
    # bf16 keeps 8 bits of mantissa: about 0.4% relative error per op, far from changing direction.
    assert cos.min() > 0.999


def test_position_ids_in_a_checkpoint_are_accepted(tiny_copy):
    sd = weights(tiny_copy)
    sd["text_model.embeddings.position_ids"] = torch.arange(64)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    rewrite(tiny_copy, sd)
    siglip_so400m.load(tiny_copy)


def test_missing_keys_are_listed(tiny_copy):
    sd = weights(tiny_copy)
    del sd["text_model.head.weight"], sd["logit_bias"]
    rewrite(tiny_copy, sd)
    with pytest.raises(CheckpointError, match=r"missing keys: .*text_model.head.weight") as e:
        siglip_so400m.load(tiny_copy)
    assert "logit_bias" in str(e.value) and "is this a SigLIP checkpoint" in str(e.value)


def test_unexpected_keys_are_listed_and_long_lists_cut(tiny_copy):
    sd = weights(tiny_copy)
    for i in range(20):
        sd[f"vision_model.encoder.layers.0.typo{i}.weight"] = torch.zeros(1)
    rewrite(tiny_copy, sd)
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*typo.*\(12 more\)"):
        siglip_so400m.load(tiny_copy)


def test_config_that_does_not_match_the_weights_is_refused(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 128
    cfg["text_config"]["num_hidden_layers"] = 1
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        siglip_so400m.load(tiny_copy)
    msg = str(e.value)
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert f"wrong shapes: {fc1}: file (96, 64) vs config (128, 64)" in msg
    assert "unexpected keys: text_model.encoder.layers.1." in msg
    assert "does config.json belong to these weights" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_file_is_refused(tiny_copy, damage):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        siglip_so400m.load(tiny_copy)


def test_pickle_only_checkpoints_are_refused_with_the_reason(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, a pickle file: .*arbitrary code"):
        siglip_so400m.load(tiny_copy)
    with pytest.raises(CheckpointError, match="is a pickle file"):
        siglip_so400m.load(tiny_copy / "pytorch_model.bin")


def test_nonexistent_paths_and_bad_names_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        siglip_so400m.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        siglip_so400m.load(tmp_path)
    with pytest.raises(CheckpointError, match="revision.*local path"):
        siglip_so400m.load(tmp_path, revision="main")


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import, so use a fresh process."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_hub_id_loads_offline_from_the_hub_cache(tmp_path, tiny_ckpt):
    snap = hub_cache(tmp_path / "cache", REPO, tiny_ckpt)
    code = (
        "import json, siglip_so400m\n"
        f"m, p = siglip_so400m.load({REPO!r})\n"
        "print(json.dumps([m.checkpoint.revision, str(m.checkpoint.folder), p.texts(['a cat']).shape[1],"
        " float(m.logit_scale)]))\n"
    )
    r = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    revision, folder, length, scale = json.loads(r.stdout)
    assert revision == snap.name and Path(folder) == snap
    assert length == 64 and scale == pytest.approx(2.3)


def test_offline_with_nothing_cached_says_how_to_fix_it(tmp_path):
    code = f"import siglip_so400m\nsiglip_so400m.load({REPO!r})\n"
    r = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode != 0
    assert "CheckpointError: cannot fetch google/siglip-so400m-patch14-384@main" in r.stderr
    assert "--model DIR" in r.stderr and f"hf download {REPO}" in r.stderr


def test_hub_config_reads_the_same_as_our_explicit_config(tmp_path):
    # The Hub's own config.json for google/siglip-so400m-patch14-384 lists only what differs from
    # transformers' defaults (as below, bookkeeping keys included).
    hub_sparse = {
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                        "num_attention_heads": 16, "num_hidden_layers": 27},
        "torch_dtype": "float32", "transformers_version": "4.37.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14},
    }
    ours = SiglipConfig.from_json(SO400M_CONFIG)
    from_hub = SiglipConfig.from_dict(hub_sparse)
    # The reference is transformers reading the same sparse file, field by field, defaults included.
    from transformers import SiglipConfig as HFConfig

    hf_sparse = HFConfig.from_dict(hub_sparse)
    for sub, cls in (("vision_config", VisionConfig), ("text_config", TextConfig)):
        for f in dataclasses.fields(cls):
            if f.name == "num_patches":  # SigLIP 2 NaFlex's key, absent from SiglipVisionConfig
                assert getattr(from_hub, sub).num_patches is None
                continue
            want = getattr(getattr(hf_sparse, sub), f.name)
            assert getattr(getattr(from_hub, sub), f.name) == want, f"{sub}.{f.name}"
    assert from_hub.initializer_factor == hf_sparse.initializer_factor
    assert from_hub == ours
    assert ours.vision_config.num_positions == 729 and ours.vision_config.head_dim == 72
    # Every field is spelled out in configs/*.json, so nothing rests on a hidden default.
    explicit = json.loads(SO400M_CONFIG.read_text())
    assert explicit == ours.to_dict()
    for sub, cls in (("vision_config", VisionConfig), ("text_config", TextConfig)):
        assert {f.name for f in dataclasses.fields(cls)} - {"num_patches"} <= set(explicit[sub])
    # And transformers reads our explicit file to the same model shape.
    (tmp_path / "config.json").write_text(SO400M_CONFIG.read_text())
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.vision_config.intermediate_size == 4304 and hf.text_config.projection_size == 1152


@pytest.mark.parametrize(("patch", "message"), [
    ({"vision_config": {"hidden_sise": 3}}, "unknown config keys: vision_config.hidden_sise"),
    ({"logit_scale_init": 1}, "unknown config keys: logit_scale_init"),
    ({"model_type": "clip"}, "model_type is 'clip'"),
    ({"text_config": {"hidden_act": "gelu"}}, "hidden_act is 'gelu'"),
    ({"vision_config": {"num_attention_heads": 5}}, "not divisible"),
    ({"vision_config": {"vision_use_head": False}}, "MAP head"),
    ({"text_config": {"projection_size": 10}}, "must equal text_config.projection_size"),
])
def test_bad_configs_raise_errors_naming_the_key(patch, message):
    d = json.loads(SO400M_CONFIG.read_text())
    for k, v in patch.items():
        if isinstance(v, dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    with pytest.raises(ValueError, match=message):
        SiglipConfig.from_dict(d)


@pytest.mark.parametrize("checkpoint", [[], ["--checkpoint", "google/siglip2-so400m-patch16-naflex"]],
                         ids=["siglip", "naflex"])
def test_the_testing_checkpoint_writer_prints_the_folder_and_nothing_of_transformers(tmp_path, checkpoint):
    """`python -m siglip_so400m.testing DIR --tiny` (CI's prebuilt checkpoint) printed transformers'
    warnings about CLIP's bos/eos ids outside the tiny vocabulary, and a shard progress bar."""
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "siglip_so400m.testing", str(out), "--tiny", *checkpoint],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n" and r.stderr == ""
    assert siglip_so400m.load(out)[0].config.text_config.vocab_size > 0  # and the checkpoint loads
