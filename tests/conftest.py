"""Checkpoints in the exact Hub layout, made by transformers itself, with random weights
(see siglip_so400m.testing): nothing can be downloaded here, so every test builds what it
compares against."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from siglip_so400m.testing import save_checkpoint, so400m_hf_config, tiny_hf_config, train_spiece


@pytest.fixture(scope="session")
def spiece(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model")


@pytest.fixture(scope="session")
def tiny_config(spiece):
    return tiny_hf_config(spiece)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config, spiece) -> Path:
    """A tiny random SigLIP saved by transformers: config, weights, tokenizer, preprocessor."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config, spiece)


@pytest.fixture
def tiny_copy(tmp_path, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint for tests that damage it."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture(scope="session")
def so400m_ckpt(tmp_path_factory, spiece) -> Path:
    """The full so400m shape, random weights, 3.5 GB: the real file's 888 keys and shapes."""
    return save_checkpoint(tmp_path_factory.mktemp("so400m"), so400m_hf_config(), spiece)
