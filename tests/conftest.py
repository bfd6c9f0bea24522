"""Checkpoints in the exact Hub layout, made by transformers itself, with random weights
(see siglip_so400m.testing): nothing can be downloaded here, so every test builds what it
compares against."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from siglip_so400m.testing import (
    save_checkpoint,
    save_naflex_checkpoint,
    so400m_hf_config,
    tiny_hf_config,
    train_gemma_spiece,
    train_spiece,
)

# The kernel choices the tests' processes measure (siglip_so400m.autotune) go to a folder of this
# run, shared by its subprocesses, not to the user's ~/.cache.
if "SIGLIP_SO400M_CACHE" not in os.environ:
    import tempfile

    os.environ["SIGLIP_SO400M_CACHE"] = tempfile.mkdtemp(prefix="siglip-so400m-kernels-")

# int8 is refused where it measured slower than float32 (int8.check_speed): on some CPUs it is, and
# the tests of what int8 computes must run there too. tests/test_int8.py tests the refusal itself.
os.environ.setdefault("SIGLIP_SO400M_INT8_SPEED_CHECK", "0")

# A checkpoint folder made beforehand by `python -m siglip_so400m.testing DIR --tiny`, for
# environments without transformers (scripts/check_dependency_floors.py); tests that compare
# against transformers still need it.
PREBUILT = os.environ.get("SIGLIP_SO400M_TEST_TINY_CKPT")


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Elsewhere (an AVX2-only
    EPYC) torch emulates them about 30x slower than fp32: minutes for one 384 px image at full size,
    where pick_dtype gives fp32 anyway. The full-size bf16 checks are skipped there, with that
    reason, to keep CI's time; the tiny-model bf16 tests run everywhere."""
    import torch

    from siglip_so400m.api import pick_dtype

    return pick_dtype(torch.device("cpu")) == torch.bfloat16


@pytest.fixture(scope="session")
def spiece(tmp_path_factory) -> Path:
    if PREBUILT:
        return Path(PREBUILT) / "spiece.model"
    return train_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model")


@pytest.fixture(scope="session")
def tiny_config(spiece):
    return tiny_hf_config(spiece)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, request, spiece) -> Path:
    """A tiny random SigLIP saved by transformers: config, weights, tokenizer, preprocessor."""
    if PREBUILT:
        return Path(PREBUILT)
    return save_checkpoint(tmp_path_factory.mktemp("tiny"), request.getfixturevalue("tiny_config"), spiece)


@pytest.fixture(scope="session")
def gemma_spiece(tmp_path_factory) -> Path:
    """A SentencePiece model shaped like SigLIP 2's Gemma tokenizer."""
    return train_gemma_spiece(tmp_path_factory.mktemp("gemma") / "tokenizer.model")


@pytest.fixture(scope="session")
def naflex_ckpt(tmp_path_factory, gemma_spiece) -> Path:
    """A tiny random SigLIP 2 NaFlex (transformers' Siglip2Model) in the Hub layout: sparse config.json
    with model_type siglip2, preprocessor_config.json with max_num_patches, the Gemma tokenizer."""
    return save_naflex_checkpoint(tmp_path_factory.mktemp("naflex"), gemma_spiece)


@pytest.fixture
def tiny_copy(tmp_path, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint for tests that damage it."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture(scope="session")
def so400m_ckpt(tmp_path_factory, spiece) -> Path:
    """The full so400m shape, random weights, 3.5 GB: the real file's 888 keys and shapes."""
    return save_checkpoint(tmp_path_factory.mktemp("so400m"), so400m_hf_config(), spiece)


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory, tiny_ckpt) -> Path:
    """The tiny model fine-tuned for 300 steps on 180 coloured shapes (tests/shapes.py): a model that
    has learned something, trained once for test_train and test_search."""
    import subprocess
    import sys

    from shapes import draw_shapes, write_csv

    folder = tmp_path_factory.mktemp("shapes_train")
    data = write_csv(folder / "train.csv", draw_shapes(folder, 180, seed=0))
    # In a process of its own: 300 fp32 steps amplify the last bits of every matmul, and in the test
    # process those depended on what earlier tests had done to it (the suite's order gave a model whose
    # worst class found 2 of 5 shapes; alone it found 3), so the model is the same whoever asks first.
    out = folder / "run"
    subprocess.run([sys.executable, "-m", "siglip_so400m", "finetune", "--model", str(tiny_ckpt),
                    "--data", str(data), "--output", str(out), "--steps", "300", "--batch-size", "32",
                    "--lr", "3e-3", "--precision", "fp32", "--num-workers", "0", "--log-every", "25",
                    "--save-every", "0"], check=True, capture_output=True, timeout=1800)
    return out


@pytest.fixture
def record_reads(monkeypatch):
    """record_reads(module) replaces `module.safe_open` with one that records the name of every tensor
    read through it, and returns that list (for tests of what a load or a cache reads)."""

    def install(module) -> list[str]:
        read: list[str] = []
        real = module.safe_open

        class Recording:
            def __init__(self, *a, **k):
                self.f = real(*a, **k)

            def __enter__(self):
                self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def get_tensor(self, name):
                read.append(name)
                return self.f.get_tensor(name)

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(module, "safe_open", Recording)
        return read

    return install
