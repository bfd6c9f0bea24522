"""The seams between jobs: one way to open a model, one record of what a stored output was computed
with, checked by every reader; and the refusals that must be one line, never a traceback."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import draw_shapes, write_csv

import siglip_so400m
from siglip_so400m.errors import RecordMismatch, UsageError
from siglip_so400m.search import Index, SearchError

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "siglip_so400m"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """11 small images of different aspect ratios."""
    folder = tmp_path_factory.mktemp("pictures")
    for i in range(11):
        arr = np.random.default_rng(i).integers(0, 256, (24 + 6 * i, 80 - 4 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """An ImageFolder of 2 classes, 4 images each."""
    root = tmp_path_factory.mktemp("labelled")
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i in range(4):
            arr = np.random.default_rng(10 * c + i).integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _unpad(out: Path) -> None:
    """Make an embed folder look like one written before part numbers were zero-padded."""
    for kind in ("img_emb", "metadata", "errors"):
        for f in (out / kind).iterdir():
            stem, _, ext = f.name.partition(".")
            head, _, number = stem.rpartition("_")
            f.rename(f.with_name(f"{head}_{int(number)}.{ext}"))


# --- 1. an index over parts that embed renamed ---------------------------------------------------

def test_an_index_built_before_embed_renamed_the_parts_is_refused_not_searched_with_wrong_ids(
        tiny_ckpt, pictures, tmp_path):
    from siglip_so400m.index_tuning import build_index
    from siglip_so400m.search import dedup

    out = tmp_path / "emb"
    kw = dict(model=str(tiny_ckpt), dtype="float32", part_size=1, workers=0, progress=False)
    siglip_so400m.embed(pictures, out, **kw)
    _unpad(out)  # img_emb_10.npy sorts before img_emb_2.npy: the ids of an index built now follow that
    build_index(out, kind="flat", log=lambda m: None)
    siglip_so400m.embed(pictures, out, **kw)  # continues the folder: renames the parts to padded names
    assert sorted(p.name for p in (out / "img_emb").iterdir())[2] == "img_emb_000002.npy"
    with pytest.raises(SearchError, match=r"built over other img_emb/ parts .* run `siglip-so400m index"):
        Index.load(out)
    with pytest.raises(SearchError, match="built over other img_emb/ parts"):
        dedup(Index.load(out), 0.99)
    build_index(out, kind="flat", log=lambda m: None)  # rebuilt: each image's own vector finds itself
    index = Index.load(out)
    for i in range(len(index)):
        _, ids = index.topk(index.collection.vectors(np.array([i])), 1)
        assert ids[0, 0] == i


# --- 2. eval --embeddings at another budget or precision ------------------------------------------

def test_eval_refuses_an_embeddings_folder_of_another_budget_or_dtype_and_records_both(
        naflex_ckpt, labelled, tmp_path):
    from siglip_so400m.evaluate import zero_shot

    common = dict(model=str(naflex_ckpt), workers=0, templates=["{}"], progress=False)
    siglip_so400m.embed(labelled, tmp_path / "b32", model=str(naflex_ckpt), dtype="float32", recursive=True,
                        workers=0, max_num_patches=32, progress=False)
    # No --max-num-patches: the checkpoint's 256 is what this run computes with, not the folder's 32.
    with pytest.raises(RecordMismatch, match="max_num_patches: 32 there, 256 now"):
        zero_shot(labelled, embeddings=tmp_path / "b32", dtype="float32", **common)
    got = zero_shot(labelled, embeddings=tmp_path / "b32", dtype="float32", max_num_patches=32, **common)
    assert got["max_num_patches"] == 32 and got["dtype"] == "float32"
    # An int8 folder evaluated as float32: refused; with --dtype left out, the folder's is used.
    siglip_so400m.embed(labelled, tmp_path / "q", model=str(naflex_ckpt), dtype="int8", recursive=True,
                        workers=0, progress=False)
    with pytest.raises(RecordMismatch, match="dtype: 'int8' there, 'float32' now"):
        zero_shot(labelled, embeddings=tmp_path / "q", dtype="float32", **common)
    got = zero_shot(labelled, embeddings=tmp_path / "q", **common)
    assert got["dtype"] == "int8" and got["max_num_patches"] == 256


# --- 3. a fine-tuning resume with another patch budget --------------------------------------------

def test_a_finetuning_resume_with_another_patch_budget_is_refused(naflex_ckpt, tmp_path):
    from siglip_so400m.train import TrainConfig, train
    from siglip_so400m.weights import CheckpointError

    data = write_csv(tmp_path / "d.csv", draw_shapes(tmp_path, 8, seed=3))
    base = dict(model=str(naflex_ckpt), data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                precision="fp32", num_workers=0, log_every=1, save_every=1, max_num_patches=16)
    train(TrainConfig(steps=2, **base))
    with pytest.raises(CheckpointError, match="--max-num-patches 16 then, 24 now"):
        train(TrainConfig(steps=2, **{**base, "max_num_patches": 24}))


# --- 4. a refused embed writes nothing ------------------------------------------------------------

def test_a_refused_embed_writes_nothing_and_the_corrected_command_runs(tiny_ckpt, pictures, tmp_path):
    from siglip_so400m.embedding import InputError

    out = tmp_path / "emb"
    with pytest.raises(InputError, match="max_num_patches .* applies to SigLIP 2 NaFlex"):
        siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), max_num_patches=32, workers=0)
    assert not out.exists()
    manifest = siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), workers=0, progress=False)
    assert manifest["counts"]["images"] == 11


# --- 5. search with another checkpoint's text tower -----------------------------------------------

def test_search_with_another_checkpoint_is_refused_naming_the_field(tiny_ckpt, tiny_config, spiece,
                                                                     pictures, tmp_path, capsys):
    from siglip_so400m.search import search_main
    from siglip_so400m.testing import save_checkpoint

    other = save_checkpoint(tmp_path / "other", tiny_config, spiece, seed=7)  # same shapes, other weights
    out = tmp_path / "emb"
    siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), dtype="float32", workers=0, progress=False)
    with pytest.raises(RecordMismatch, match=r"model: '.*tiny.*' there, '.*other' now"):
        Index.load(out, model=str(other)).search(texts=["a photo"])
    with pytest.raises(SystemExit) as e:
        search_main([str(out), "a photo", "--model", str(other)])
    assert e.value.code == 2 and "there, " in capsys.readouterr().err
    assert Index.load(out).search(texts=["a photo"], k=3)[0]  # the manifest's own model: answers


# --- 6. int8: one meaning, NaFlex included ---------------------------------------------------------

def test_int8_runs_the_other_layers_in_float32_in_every_command_and_works_for_naflex(
        tiny_ckpt, naflex_ckpt, labelled, tmp_path, monkeypatch):
    from siglip_so400m import api
    from siglip_so400m.zeroshot import zero_shot_main

    seen = []
    real = api.quantize_int8
    monkeypatch.setattr(api, "quantize_int8", lambda model, dtype, *a, **k: seen.append(dtype) or
                        real(model, dtype, *a, **k))
    image = str(next(labelled.glob("cat/*.png")))
    assert zero_shot_main([image, "--labels", "a", "b", "--model", str(tiny_ckpt), "--dtype", "int8",
                           "--no-cache", "--json"]) == 0
    siglip_so400m.embed(labelled, tmp_path / "q", model=str(naflex_ckpt), dtype="int8", recursive=True,
                        workers=0, progress=False)  # crashed: patches moved to a released weight's device
    assert seen == [torch.float32, torch.float32]
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["dtype"] == "int8"


# --- 7. /v1/search's NaFlex image queries at the collection's budget ------------------------------

def test_serve_refuses_an_index_embedded_at_another_patch_budget_than_its_own(naflex_ckpt, labelled,
                                                                              tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from siglip_so400m import serve

    started = []
    monkeypatch.setattr(serve, "_server_class", lambda: lambda config: type(
        "S", (), {"run": lambda self: started.append(config)})())
    out = tmp_path / "emb"
    siglip_so400m.embed(labelled, out, model=str(naflex_ckpt), dtype="float32", recursive=True, workers=0,
                        max_num_patches=32, progress=False)
    base = ["--model", str(naflex_ckpt), "--dtype", "float32", "--index", str(out), "--port", "0"]
    with pytest.raises(SystemExit) as e:
        serve.serve_main(base)
    assert e.value.code == 2 and not started
    assert "max_num_patches: 32 there, 256 now" in capsys.readouterr().err
    assert serve.serve_main([*base, "--max-num-patches", "32"]) == 0 and started


# --- 8. one line, never a traceback ----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error_in_every_command(tiny_ckpt, labelled, tmp_path, capsys):
    from siglip_so400m.attention_maps import attention_map_main
    from siglip_so400m.embedding import main as embed_main
    from siglip_so400m.evaluate.cli import eval_main

    image = str(next(labelled.glob("cat/*.png")))
    commands = {
        "embed": lambda: embed_main([image, "-o", str(tmp_path / "e"), "--model", str(tiny_ckpt),
                                     "--device", "cuda"]),
        "eval": lambda: eval_main(["zero-shot", str(labelled), "--model", str(tiny_ckpt),
                                   "--device", "cuda"]),
        "attention-map": lambda: attention_map_main([image, "--output", str(tmp_path / "a"), "--model",
                                                     str(tiny_ckpt), "--device", "cuda"]),
    }
    if sys.modules.get("fastapi") is not None or _importable("fastapi"):
        from siglip_so400m.serve import serve_main

        commands["serve"] = lambda: serve_main(["--model", str(tiny_ckpt), "--device", "cuda"])
    for name, run in commands.items():
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err
        assert e.value.code == 2, name
        assert "--device cuda: CUDA is not available here" in err and err.count("error:") == 1, (name, err)
    assert not (tmp_path / "e").exists()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_ctrl_c_during_embed_is_one_line_and_the_rerun_continues(tiny_ckpt, pictures, tmp_path):
    out = tmp_path / "emb"
    code = ("import sys, siglip_so400m.embedding as e\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "e._run = stop\n"
            f"sys.exit(e.main([{str(pictures)!r}, '-o', {str(out)!r}, '--model', {str(tiny_ckpt)!r}, "
            "'--workers', '0']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert "interrupted" in r.stderr and "run the same command again to continue" in r.stderr


def test_finetune_output_that_is_a_file_or_in_use_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    from siglip_so400m.train import finetune_main

    data = write_csv(tmp_path / "d.csv", draw_shapes(tmp_path, 4, seed=2))
    base = ["--model", str(tiny_ckpt), "--data", str(data), "--steps", "1", "--batch-size", "2",
            "--num-workers", "0", "--precision", "fp32"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        finetune_main([*base, "--output-dir", str(tmp_path / "a_file")])
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".lock", "a+") as held:  # another fine-tuning run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert finetune_main([*base, "--output-dir", str(busy)]) == 1
    err = capsys.readouterr().err
    assert "in use by another fine-tuning run" in err and err.count("error:") == 1
    assert not (busy / "checkpoint").exists()


def test_index_tune_queries_naming_a_missing_or_non_npy_file_is_a_usage_error(pictures, tiny_ckpt,
                                                                              tmp_path, capsys):
    from siglip_so400m.index_tuning import index_main

    out = tmp_path / "emb"
    siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), dtype="float32", workers=0, progress=False)
    (tmp_path / "q.txt").write_text("not an array")
    for path, says in ((tmp_path / "none.npy", "no such file"), (tmp_path / "q.txt", "not a .npy array")):
        with pytest.raises(SystemExit) as e:
            index_main([str(out), "--tune-queries", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and "Traceback" not in err, err


# --- 9. outputs respect the umask --------------------------------------------------------------------

def test_outputs_get_the_mode_the_umask_gives_not_0600(tiny_ckpt, pictures, tmp_path):
    from siglip_so400m.weights import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda p: p.write_text("x"))
        siglip_so400m.embed(pictures, tmp_path / "emb", model=str(tiny_ckpt), workers=0, progress=False)
        os.umask(0o027)
        atomic_write(tmp_path / "g.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o640
    for f in [tmp_path / "emb" / "manifest.json", *(tmp_path / "emb").glob("*/*_000000.*")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- the structure that keeps the seams closed --------------------------------------------------------

def _parsers(monkeypatch) -> dict:
    """Each command's argparse parser, captured as it parses (the command never runs)."""
    import argparse
    import importlib

    from siglip_so400m import attention_maps, embedding, exporting, search, serve, train, zeroshot
    from siglip_so400m.evaluate import cli as eval_cli

    convert = importlib.import_module("siglip_so400m.convert")  # the package's `convert` is the function

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    mains = {"zero-shot": zeroshot.zero_shot_main, "finetune": train.finetune_main,
             "embed": embedding.main, "eval": eval_cli.eval_main, "serve": serve.serve_main,
             "attention-map": attention_maps.attention_map_main, "search": search.search_main,
             "export": exporting.export_main, "convert": convert.convert_main}
    found = {}
    for name, main in mains.items():
        with pytest.raises(Captured) as e:
            main([])
        parser = e.value.args[0]
        if name == "eval":
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            found.update({f"eval {k}": v for k, v in sub.choices.items()})
        else:
            found[name] = parser
    return found


def _flags(parser) -> dict:
    return {s: (a.default, a.help, tuple(a.choices or ())) for a in parser._actions
            for s in a.option_strings}


MODEL_FLAGS = ("--model", "--revision", "--dtype", "--device", "--threads", "--image-size",
               "--max-num-patches")


def test_every_command_that_reads_images_declares_the_same_model_flags(monkeypatch):
    parsers = _parsers(monkeypatch)
    ref = _flags(parsers["zero-shot"])
    assert set(MODEL_FLAGS) <= set(ref)
    for name in ("embed", "eval zero-shot", "eval retrieval", "serve"):
        flags = _flags(parsers[name])
        for f in MODEL_FLAGS:
            assert flags.get(f) == ref[f], (name, f, flags.get(f), ref[f])
    # attention-map: the same flags, float32 and bfloat16 only; fine-tuning: those it takes (its
    # precision is autocast's, --precision); search: defaults from the collection's record.
    am = _flags(parsers["attention-map"])
    assert all(am[f][:2] == ref[f][:2] for f in MODEL_FLAGS) and "int8" not in am["--dtype"][2]
    ft = _flags(parsers["finetune"])
    assert all(ft[f] == ref[f] for f in ("--model", "--revision", "--device", "--image-size",
                                         "--max-num-patches"))
    se = _flags(parsers["search"])
    assert se["--model"][0] is None and "embedded with" in se["--model"][1]
    assert all(se[f] == ref[f] for f in ("--revision", "--device", "--threads"))
    # Backends: the same two flags where a command takes them.
    assert _flags(parsers["embed"])["--backend"] == _flags(parsers["serve"])["--backend"]
    assert _flags(parsers["embed"])["--graphs"] == _flags(parsers["serve"])["--graphs"]


def test_every_command_takes_its_model_as_model_and_names_its_output_folder_output_o(monkeypatch):
    parsers = _parsers(monkeypatch)
    for name in ("embed", "export", "attention-map", "finetune", "convert"):
        flags = _flags(parsers[name])
        assert "--output" in flags and "-o" in flags, name
        assert "--model" in flags, name


# Modules that make up one job between them and may share private names.
JOBS = {"search": "search", "index_tuning": "search"}


def _job(module: str) -> str:
    top = module.split(".")[0]
    return JOBS.get(top, top)


def test_no_module_imports_another_jobs_private_names():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        me = ".".join(rel.parts)
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = rel.parts[: len(rel.parts) - node.level]
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for a in node.names:
                    if a.name.startswith("_") and _job(mod) != _job(me):
                        problems.append(f"{me} imports {mod}.{a.name}")
                    aliases[a.asname or a.name] = f"{mod}.{a.name}" if not node.module else mod
                    if node.module is None:
                        aliases[a.asname or a.name] = ".".join([*base, a.name])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                mod = aliases.get(node.value.id)
                if mod is not None and (SRC / (mod.replace(".", "/") + ".py")).is_file() \
                        and _job(mod) != _job(me):
                    problems.append(f"{me} uses {mod}.{node.attr}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_usage_errors_exit_2_and_failures_1_decided_in_one_place(capsys):
    from siglip_so400m import cli
    from siglip_so400m.errors import SiglipError

    assert issubclass(RecordMismatch, UsageError) and UsageError.exit_code == 2 and SiglipError.exit_code == 1
    from siglip_so400m.embedding import EmbedError, InputError
    from siglip_so400m.evaluate.inputs import EvalError
    from siglip_so400m.weights import CheckpointError

    for cls in (EmbedError, EvalError, SearchError, CheckpointError):
        assert issubclass(cls, SiglipError) and cls.exit_code == 1
    assert InputError.exit_code == 2
    # Whatever a command lets through reaches cli.main as one line with its status.
    assert cli.main(["search", "/nonexistent/folder", "x"]) in (1, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_int8_and_graph_backends_take_the_cpu_when_device_is_auto_even_beside_a_gpu(monkeypatch):
    from siglip_so400m.modelspec import ModelSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    run = ModelSpec(dtype="int8").resolve()
    assert run.device.type == "cpu" and run.quantize == "int8" and run.dtype == torch.float32
    with pytest.raises(UsageError, match="--dtype int8 runs on the CPU only"):
        ModelSpec(dtype="int8", device="cuda").resolve()


def test_a_collection_embedded_at_another_image_size_is_queried_at_that_size(tiny_ckpt, pictures, tmp_path):
    out = tmp_path / "emb"
    siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), dtype="float32", image_size=48, workers=0,
                        progress=False)
    index = Index.load(out)
    path = sorted(pictures.glob("*.png"))[4]
    row = next(i for i in range(len(index)) if index.collection.metadata(i)["image_path"] == str(path))
    hit = index.search(images=[str(path)], k=1)[0][0]
    assert hit["id"] == row and hit["cosine"] > 0.999  # at the checkpoint's 32 px it is another vector
    pytest.importorskip("fastapi")
    from siglip_so400m.api import Processor
    from siglip_so400m.modelspec import computed_with
    from siglip_so400m.serve import _load_index
    from siglip_so400m.weights import resolve

    ckpt = resolve(str(tiny_ckpt))  # a server at the checkpoint's own size: refused, naming both
    with pytest.raises(RecordMismatch, match="image_size: 48 there, 32 now.*--image-size 48"):
        _load_index(str(out), ckpt, computed_with(ckpt, Processor.from_checkpoint(ckpt), "float32"))


def test_a_graph_backends_collection_is_queried_by_eager_float32_and_old_int8_is_refused(
        tiny_ckpt, pictures, tmp_path):
    out = tmp_path / "emb"
    siglip_so400m.embed(pictures, out, model=str(tiny_ckpt), dtype="float32", workers=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    # Embedded through `export --fp16` ONNX graphs: labelled fp16, checked against eager float32.
    (out / "manifest.json").write_text(json.dumps({**manifest, "backend": "onnx", "dtype": "fp16"}))
    assert Index.load(out).search(texts=["a photo"], k=2)[0]
    # int8 before activations were quantized per row: another computation, refused by name.
    (out / "manifest.json").write_text(json.dumps({**manifest, "dtype": "int8"}))
    with pytest.raises(RecordMismatch, match="quantization: None there"):
        Index.load(out).search(texts=["a photo"], k=2)
