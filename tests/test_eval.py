"""`eval`: zero-shot accuracy and retrieval recall, proven equal to the definitions computed on
transformers' SiglipModel, and to clip_benchmark's own functions; a trained model scores far above
chance; every bad input gets one clear message."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import CAPTIONS, draw_shapes

import siglip_so400m
from siglip_so400m.cli import main
from siglip_so400m.errors import RecordMismatch
from siglip_so400m.evaluate import EvalError, read_classes, read_templates, retrieval, zero_shot
from siglip_so400m.image import IMAGE_SUFFIXES

TEMPLATES = ["a photo of {}.", "a drawing of {}", "{}, in a picture"]


def run(capsys, *args) -> tuple[int, str, str]:
    if args[0] == "zero-shot" and "--cache-dir" not in args:
        args = (*args, "--no-cache")  # never the user's ~/.cache
    try:
        code = main(["eval", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder of the 9 shape classes ("a red circle", ...), `per_class` PNGs each."""
    pool = root.parent / f"{root.name}_pool"
    rows = draw_shapes(pool, 30 * per_class + 60, seed)
    count = dict.fromkeys(CAPTIONS, 0)
    for r in rows:
        if count[r["caption"]] < per_class:
            (root / r["caption"]).mkdir(parents=True, exist_ok=True)
            shutil.move(pool / r["image"], root / r["caption"] / r["image"])
            count[r["caption"]] += 1
    assert set(count.values()) == {per_class}
    shutil.rmtree(pool)
    return root


def files_of(folder: Path) -> list[tuple[Path, int]]:
    """(image, class index) in torchvision's ImageFolder order."""
    classes = sorted(d.name for d in folder.iterdir())
    return [(f, k) for k, c in enumerate(classes) for f in sorted((folder / c).iterdir())]


def hf_embeddings(ckpt: Path, images: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings from transformers alone, fp32: its model, its PIL image
    processor, its SiglipTokenizer padding to max_length as SigLIP was trained."""
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    model = SiglipModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    pixels = SiglipImageProcessorPil.from_pretrained(ckpt)(
        images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    L = model.config.text_config.max_position_embeddings
    ids = SiglipTokenizer.from_pretrained(ckpt)(texts, padding="max_length", max_length=L, truncation=True,
                                                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.vision_model(pixel_values=pixels).pooler_output.numpy().astype(np.float64)
        txt = model.text_model(input_ids=ids).pooler_output.numpy().astype(np.float64)
    return img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)


def reference_zero_shot(ckpt: Path, folder: Path, templates: list[str]):
    """The definition, in numpy: class = normalized mean of the normalized template embeddings."""
    files = files_of(folder)
    classes = sorted(d.name for d in folder.iterdir())
    img, txt = hf_embeddings(ckpt, [f for f, _ in files], [t.format(c) for c in classes for t in templates])
    cls = txt.reshape(len(classes), len(templates), -1).mean(1)
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    scores = img @ cls.T  # (N, C)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    y = np.array([k for _, k in files])
    recalls = [np.mean(order[y == k, 0] == k) for k in range(len(classes))]
    metrics = {"acc1": float(np.mean(order[:, 0] == y)), "acc5": float(np.mean((order == y[:, None]).any(1))),
               "mean_per_class_recall": float(np.mean(recalls))}
    gaps = -np.diff(np.sort(scores, axis=1)[:, ::-1][:, :6], axis=1)
    return metrics, [[classes[j] for j in row] for row in order], files, gaps.min()


def test_zero_shot_metrics_and_top5_equal_the_definition_on_transformers_siglip(capsys, tiny_ckpt, tmp_path):
    folder = image_folder(tmp_path / "set", per_class=4, seed=3)
    tfile = tmp_path / "templates.txt"
    tfile.write_text("\n".join(TEMPLATES) + "\n")
    code, out, err = run(capsys, "zero-shot", folder, "--model", tiny_ckpt, "--dtype", "float32",
                         "--templates-file", tfile, "--json", "--predictions", tmp_path / "pred.jsonl",
                         "--workers", "0", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    result = json.loads(out)
    ref, top5, files, gap = reference_zero_shot(tiny_ckpt, folder, TEMPLATES)
    # Our unit embeddings and transformers' agree to 1.6e-7 here (measured); the closest two of any
    # image's six best classes are 1.8e-5 apart, so equal rankings are the proof they look like.
    assert gap > 2e-6, gap
    assert result["metrics"]["acc1"] == ref["acc1"] and result["metrics"]["acc5"] == ref["acc5"]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"],
                                                                       abs=1e-12)
    assert {k: result[k] for k in ("dataset", "task", "images", "classes", "templates")} == {
        "dataset": "set", "task": "zeroshot_classification", "images": 36, "classes": 9, "templates": 3}
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["path"] for p in preds] == [str(f) for f, _ in files]
    assert [p["label"] for p in preds] == [f.parent.name for f, _ in files]
    assert [p["top5"] for p in preds] == top5
    # A random model: the rankings differ between images, and neither metric is trivially 0 or 1.
    assert len({tuple(t) for t in top5}) >= 5 and 0 < ref["acc5"] < 1  # 7 distinct top-5 orders
    per_class = {r["class"]: r for r in result["per_class"]}
    assert sum(r["top1_correct"] for r in per_class.values()) == round(ref["acc1"] * 36)
    assert all(r["images"] == 4 for r in per_class.values())


def test_csv_parquet_and_webdataset_sets_give_the_imagefolder_numbers(tiny_ckpt, tmp_path):
    folder = image_folder(tmp_path / "set", per_class=2, seed=5)
    files = files_of(folder)
    classes = sorted(d.name for d in folder.iterdir())
    kw = dict(model=str(tiny_ckpt), dtype="float32", workers=0, templates=TEMPLATES)
    base = zero_shot(folder, **kw)
    # CSV: paths relative to the file, labels by name (their classes sorted, as the folders are).
    with open(tmp_path / "set.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label"])
        w.writerows([(p.relative_to(tmp_path), classes[k]) for p, k in files])
    # parquet: absolute paths, labels by index into --classes.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [str(p) for p, _ in files], "label": [k for _, k in files]}),
                   tmp_path / "set.parquet")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    # webdataset, clip_benchmark's layout: {key}.png + {key}.cls, classnames.txt beside the shards.
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "classnames.txt").write_text("\n".join(classes) + "\n")
    for s in range(2):
        with tarfile.open(tmp_path / "wds" / f"{s}.tar", "w") as tar:
            for n, (p, k) in enumerate(files[s::2]):
                key = f"s{s}_{n:03d}"
                for name, data in ((f"{key}.png", p.read_bytes()), (f"{key}.cls", str(k).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    wds_order = [f for s in range(2) for f in files[s::2]]
    for data, classes_arg, order in ((tmp_path / "set.csv", None, files),
                                     (tmp_path / "set.parquet", tmp_path / "classes.txt", files),
                                     (tmp_path / "wds", None, wds_order)):
        got = zero_shot(data, classes=classes_arg, **kw)
        assert got["metrics"] == base["metrics"], data
        by_file = {p["path"]: p for p in base["predictions"]}
        expected = [by_file[str(p)] for p, _ in order]
        assert [(p["label"], p["top5"]) for p in got["predictions"]] == \
            [(p["label"], p["top5"]) for p in expected], data


def pairs_csv(folder: Path, n: int) -> tuple[Path, list[Path], list[list[str]]]:
    """n images with two distinct captions each, one row per caption (as COCO's captions come)."""
    rows = draw_shapes(folder, n, seed=11)
    images = [folder / r["image"] for r in rows]
    captions = [[f"{r['caption']} number {i}", f"picture {i} of {r['caption']}"] for i, r in enumerate(rows)]
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows((r["image"], c) for r, caps in zip(rows, captions, strict=True) for c in caps)
    return path, images, captions


def reference_retrieval(ckpt: Path, images: list[Path], captions: list[list[str]], ks=(1, 5, 10)) -> dict:
    texts = [c for caps in captions for c in caps]
    of = np.array([i for i, caps in enumerate(captions) for _ in caps])  # the image of each caption
    img, txt = hf_embeddings(ckpt, images, texts)
    scores = txt @ img.T  # (T, I)
    t2i = np.argsort(-scores, axis=1, kind="stable")  # images, best first, per caption
    i2t = np.argsort(-scores.T, axis=1, kind="stable")  # captions, best first, per image
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean([of[t] in t2i[t, :k] for t in range(len(of))]))
        out[f"text_retrieval_recall@{k}"] = float(np.mean([(of[i2t[i, :k]] == i).any()
                                                           for i in range(len(img))]))
    return out


def test_retrieval_recalls_equal_the_definition_on_transformers_siglip(capsys, tiny_ckpt, tmp_path):
    path, images, captions = pairs_csv(tmp_path / "pairs", 16)
    code, out, err = run(capsys, "retrieval", path, "--model", tiny_ckpt, "--dtype", "float32", "--json",
                         "--workers", "2", "--batch-size", "5")
    assert code == 0, err
    result = json.loads(out)
    assert (result["task"], result["images"], result["captions"]) == ("zeroshot_retrieval", 16, 32)
    ref = reference_retrieval(tiny_ckpt, images, captions)
    assert result["metrics"].keys() == ref.keys()
    for key, value in ref.items():  # ours is a float32 mean of the hits, as clip_benchmark's
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # The random model ranks neither perfectly nor hopelessly, so the recalls carry information.
    assert 0 < ref["image_retrieval_recall@1"] < ref["image_retrieval_recall@10"] < 1
    assert 0 < ref["text_retrieval_recall@1"] < 1
    # The readable table shows the same numbers.
    code, out, _ = run(capsys, "retrieval", path, "--model", tiny_ckpt, "--dtype", "float32",
                       "--workers", "0")
    assert code == 0 and f"{ref['image_retrieval_recall@5']:9.2%}" in out.splitlines()[-2]


def test_retrieval_reads_parquet_caption_lists_and_webdataset_shards_as_the_csv(tiny_ckpt, tmp_path):
    path, images, captions = pairs_csv(tmp_path / "pairs", 10)
    kw = dict(model=str(tiny_ckpt), dtype="float32", workers=0)
    base = retrieval(path, **kw)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One row per image, its captions in a list column.
    pq.write_table(pa.table({"image": [p.name for p in images], "caption": captions}),
                   tmp_path / "pairs" / "pairs.parquet")
    # clip_benchmark's webdataset layout for COCO and Flickr: {key}.png + {key}.txt, a caption a line.
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for n, (p, caps) in enumerate(zip(images, captions, strict=True)):
            for name, data in ((f"{n:04d}.png", p.read_bytes()), (f"{n:04d}.txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for data in (tmp_path / "pairs" / "pairs.parquet", tmp_path / "pairs.tar"):
        got = retrieval(data, **kw)
        assert (got["metrics"], got["images"], got["captions"]) == (base["metrics"], 10, 20), data


def test_an_embed_folder_is_read_instead_of_embedding_again(tiny_ckpt, tmp_path):
    folder = image_folder(tmp_path / "set", per_class=3, seed=8)
    kw = dict(model=str(tiny_ckpt), dtype="float32", workers=0, templates=TEMPLATES)
    direct = zero_shot(folder, **kw)
    siglip_so400m.embed(folder, tmp_path / "emb", model=str(tiny_ckpt), dtype="float32", workers=0,
                        recursive=True, part_size=10)  # 3 parts
    from siglip_so400m.evaluate import runner

    def not_again(*a, **k):
        raise AssertionError("embedded again")

    import unittest.mock

    # With the class embeddings cached by a first run, the text tower is not run either.
    zero_shot(folder, cache_dir=tmp_path / "cache", **kw)
    with unittest.mock.patch.object(runner, "embed_items", not_again), \
            unittest.mock.patch.object(runner, "embed_labels", not_again):
        stored = zero_shot(folder, embeddings=tmp_path / "emb", cache_dir=tmp_path / "cache", **kw)
    # float16 storage moves scores by ~1e-3 of their spread at most: the same rankings here.
    assert stored["metrics"] == direct["metrics"]
    assert [p["top5"] for p in stored["predictions"]] == [p["top5"] for p in direct["predictions"]]
    # Another model's embeddings, or a folder without some of the images: refused, by name.
    other = tmp_path / "other"
    image_folder(other, per_class=1, seed=9)
    with pytest.raises(EvalError, match=r"9 of the 9 images are not in .*emb \(first: .*other/"):
        zero_shot(other, embeddings=tmp_path / "emb", **kw)
    copy = shutil.copytree(tiny_ckpt, tmp_path / "ckpt_copy")
    with pytest.raises(RecordMismatch, match=r"model: '.*tiny.*' there, '.*ckpt_copy' now"):
        zero_shot(folder, embeddings=tmp_path / "emb", **{**kw, "model": str(copy)})


def test_the_model_tuned_on_shapes_classifies_held_out_shapes_far_above_chance(capsys, shapes_model,
                                                                               tmp_path):
    # 270 shapes the fine-tuning never saw (another seed), 30 per class; chance is 1/9 = 11.1%.
    # Measured: acc@1 0.737 (199 of 270), acc@5 1.0, mean per-class recall 0.737 (30 a class, so the
    # same), fp32, on the 2-core AVX2 EPYC of this session: 6.6x chance.
    folder = image_folder(tmp_path / "held_out", per_class=30, seed=21)
    code, out, err = run(capsys, "zero-shot", folder, "--model", shapes_model, "--dtype", "float32",
                         "--templates-file", write(tmp_path / "t.txt", "{}\n"), "--json")
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert m["acc1"] >= 0.55 and m["mean_per_class_recall"] >= 0.55, m  # chance: 0.111
    assert m["acc5"] >= 0.9, m  # chance: 5/9 = 0.556


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_ensembles_are_clips_imagenet_prompts_and_class_names():
    templates = read_templates("imagenet")
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert read_templates("siglip") == read_templates(None) == ["This is a photo of {}."]
    names = read_classes("imagenet1k")
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[-1] == "toilet paper"


def test_bad_inputs_each_get_one_clear_message(capsys, tiny_ckpt, tmp_path):
    folder = image_folder(tmp_path / "set", per_class=1, seed=1)
    (folder / "an empty class").mkdir()
    code, _, err = run(capsys, "zero-shot", folder, "--model", tiny_ckpt)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    assert code == 1 and err.strip() == f"error: class folder {folder / 'an empty class'} has no images " \
        f"({suffixes}); remove it or add its images", err
    (folder / "an empty class").rmdir()

    table = write(tmp_path / "labels.csv", "path,label\nset/a red circle/x.png,a purple hexagon\n")
    classes = write(tmp_path / "classes.txt", "\n".join(CAPTIONS) + "\n")
    code, _, err = run(capsys, "zero-shot", table, "--classes", classes, "--model", tiny_ckpt)
    assert code == 1 and err.startswith(f"error: {table}, row 1: label 'a purple hexagon' is not in the "
                                        "class list (9 classes: a red circle, "), err

    bad = write(tmp_path / "bad_templates.txt", "a photo of {}\na photo without a slot\n")
    code, _, err = run(capsys, "zero-shot", folder, "--templates-file", bad, "--model", tiny_ckpt)
    assert code == 1 and err.strip() == "error: template 'a photo without a slot' must hold one {} where " \
        "the class name goes (and no other braces), e.g. 'a photo of a {}.'", err

    pairs = write(tmp_path / "pairs.csv", "image,url\nset/x.png,http://example.com\n")
    code, _, err = run(capsys, "retrieval", pairs, "--model", tiny_ckpt)
    assert code == 1 and err.strip() == f"error: {pairs}: needs a caption column (caption / captions / " \
        "text); found: image, url", err
    empty = write(tmp_path / "empty_captions.csv", "image,caption\nset/x.png,\n")
    code, _, err = run(capsys, "retrieval", empty, "--model", tiny_ckpt)
    assert code == 1 and "1 images have no caption (first: " in err, err

    # An unreadable image stops the run and is named: a metric over part of the set is not the set's.
    (folder / "a red circle" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalError, match=r"1 of 10 images cannot be read, .*broken\.png"):
        zero_shot(folder, model=str(tiny_ckpt), workers=0)
    with pytest.raises(EvalError, match=r"has 9 class folders but the class list has 1000 names"):
        zero_shot(folder, model=str(tiny_ckpt), classes="imagenet1k", workers=0)


def test_fewer_than_five_classes_report_acc5_as_nan_like_clip_benchmark_with_progress_and_eta(
        tiny_ckpt, tmp_path, capsys):
    folder = image_folder(tmp_path / "set", per_class=1, seed=2)
    for d in sorted(folder.iterdir())[4:]:
        shutil.rmtree(d)
    m = zero_shot(folder, model=str(tiny_ckpt), workers=1, progress=True)["metrics"]
    assert math.isnan(m["acc5"]) and 0 <= m["acc1"] <= 1
    err = capsys.readouterr().err
    # tqdm's bars on stderr, each with elapsed<remaining (the ETA while it runs).
    assert re.search(r"class prompts: 100%.* 4/4 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert re.search(r"images: 100%.* 4/4 \[\d\d:\d\d<\d\d:\d\d", err), err


def test_clip_benchmark_own_metric_functions_give_our_numbers(tiny_ckpt, tmp_path, monkeypatch):
    """clip_benchmark's zeroshot_classification.evaluate and zeroshot_retrieval.evaluate (installed with
    `pip install --no-deps clip_benchmark`: the two modules need only torch, tqdm and scikit-learn) on
    our model through its interface: encode_image / encode_text, a tokenizer, a DataLoader of our
    preprocessed tensors."""
    cb_cls = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                                 reason="pip install --no-deps clip_benchmark (CI does, .ci/run)")
    cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    # clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy 2.4 refuses
    # (TypeError); this float, in its module alone, takes the element as NumPy < 2.4 did.
    monkeypatch.setattr(cb_cls, "float", lambda x: float(np.asarray(x).item()), raising=False)
    model, processor = siglip_so400m.load(tiny_ckpt)
    tokenizer = processor.texts  # pads to the checkpoint's length (64 for so400m), lowercases for SigLIP 2

    folder = image_folder(tmp_path / "set", per_class=3, seed=4)
    files = files_of(folder)

    class Labelled(torch.utils.data.Dataset):
        classes = sorted(d.name for d in folder.iterdir())  # clip_benchmark reads dataset.classes

        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return processor.images([files[i][0]])[0], files[i][1]

    loader = torch.utils.data.DataLoader(Labelled(), batch_size=7)
    their_templates = [t.replace("{}", "{c}") for t in TEMPLATES]  # clip_benchmark fills in {c}
    theirs = cb_cls.evaluate(model, loader, tokenizer, Labelled.classes, their_templates, device="cpu",
                             amp=False)
    ours = zero_shot(folder, model=str(tiny_ckpt), dtype="float32", workers=0, templates=TEMPLATES)["metrics"]
    assert ours["acc1"] == theirs["acc1"] and ours["acc5"] == theirs["acc5"]
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert 0 < theirs["acc5"] < 1

    path, images, captions = pairs_csv(tmp_path / "pairs", 16)
    pairs = [(processor.images([p])[0], caps) for p, caps in zip(images, captions, strict=True)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=5, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [caps for _, caps in b]))
    theirs = cb_ret.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = retrieval(path, model=str(tiny_ckpt), dtype="float32", workers=0)["metrics"]
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():  # both float32 means of the same hits
        assert ours[key] == value, key
    assert 0 < theirs["text_retrieval_recall@1"] < theirs["text_retrieval_recall@10"]

    # What goes wrong with a naive wrapper: padding to the longest text in the batch instead of to 64.
    # SigLIP attends to its padding, so the class embeddings move (CLIP_benchmark #135).
    from transformers import SiglipTokenizer

    hf_tok = SiglipTokenizer.from_pretrained(tiny_ckpt)

    def naive(texts):
        return hf_tok(texts, padding=True, return_tensors="pt")["input_ids"]

    right = cb_cls.zero_shot_classifier(model, tokenizer, Labelled.classes, ["{c}"], "cpu", amp=False)
    wrong = cb_cls.zero_shot_classifier(model, naive, Labelled.classes, ["{c}"], "cpu", amp=False)
    assert (right * wrong).sum(0).min() < 0.99  # cosine between the two embeddings of a class


def test_the_wheel_carries_the_shipped_ensembles(tmp_path):
    import subprocess
    import sys
    import zipfile

    # Built from a clean copy: a build/ folder left in the checkout would carry stale files into it.
    root, src = Path(__file__).parents[1], tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("siglip_so400m-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("imagenet1k_classes.txt", "imagenet_templates.txt"):
        assert f"siglip_so400m/evaluate/ensembles/{name}" in names


def test_integer_labels_sort_as_numbers_alike_in_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from siglip_so400m.evaluate.inputs import read_labelled

    labels = [10, 2, 0, 1, 10, 3, 4, 5, 6, 7, 8, 9]
    write(tmp_path / "set.csv", "image,label\n" + "".join(f"{i}.png,{v}\n" for i, v in enumerate(labels)))
    pq.write_table(pa.table({"image": [f"{i}.png" for i in range(len(labels))], "label": labels}),
                   tmp_path / "set.parquet")
    got = {}
    for name in ("set.csv", "set.parquet"):
        with pytest.warns(UserWarning, match=r"the labels are numbers, so the prompts name the classes by "
                          r"them \('10' where a class name goes\); give --classes FILE"):
            got[name] = read_labelled(tmp_path / name)
    csv_set, parquet_set = got["set.csv"], got["set.parquet"]
    # Numbers in numeric order (not 0, 1, 10, 2, ...), so that class k is label k.
    assert csv_set.classes == parquet_set.classes == [str(k) for k in range(11)]
    assert csv_set.targets == parquet_set.targets == labels
    assert [i.path for i in csv_set.items] == [i.path for i in parquet_set.items]
    # Names as labels still sort as text, as the ImageFolder's folders do.
    write(tmp_path / "named.csv", "image,label\na.png,b cat\nb.png,a dog\nc.png,10 pins\n")
    assert read_labelled(tmp_path / "named.csv").classes == ["10 pins", "a dog", "b cat"]


def clip_benchmark_build():
    """clip_benchmark's own `build` (cli.main_build), the reader of result JSON files, taken from its
    installed source: importing clip_benchmark.cli needs torchvision (its dataset builders), which
    `pip install --no-deps clip_benchmark` leaves out; main_build itself uses json, os and csv only."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None:
        pytest.skip("pip install --no-deps clip_benchmark (CI does, .ci/run)")
    source = (Path(spec.origin).parent / "cli.py").read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "main_build")
    namespace: dict = {"json": json, "os": __import__("os"), "csv": csv}
    exec(compile(ast.Module([node], []), "clip_benchmark/cli.py", "exec"), namespace)
    return namespace["main_build"]


def test_result_json_of_a_local_checkpoint_is_read_by_clip_benchmarks_build(capsys, tiny_ckpt, tmp_path):
    import argparse

    build = clip_benchmark_build()
    path, _, _ = pairs_csv(tmp_path / "pairs", 6)
    code, out, err = run(capsys, "retrieval", path, "--model", tiny_ckpt, "--dtype", "float32", "--json",
                         "--workers", "0", "--recall-k", "1")
    assert code == 0, err
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "pairs.json").write_text(out)
    # clip_benchmark joins `model` and `pretrained` as strings (a null pretrained was a TypeError).
    build(argparse.Namespace(files=[str(tmp_path / "results")], output=str(tmp_path / "benchmark.csv")))
    result = json.loads(out)
    assert result["model"] == str(Path(tiny_ckpt).resolve()) and result["pretrained"] == "local"
    with open(tmp_path / "benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["model_fullname"] == f"{Path(tiny_ckpt).resolve()} local"
    assert float(rows[0]["image_retrieval_recall@1"]) == result["metrics"]["image_retrieval_recall@1"]


def test_recall_k_0_is_a_usage_error(capsys, tiny_ckpt, tmp_path):
    path, _, _ = pairs_csv(tmp_path / "pairs", 4)
    code, _, err = run(capsys, "retrieval", path, "--model", tiny_ckpt, "--recall-k", "1", "0")
    assert code == 2 and "--recall-k 1 0: every k must be at least 1" in err, err  # a bad flag: 2


def test_the_table_says_n_a_for_acc5_below_five_classes_not_nan_percent(capsys, tiny_ckpt, tmp_path):
    # Four classes: acc@5 is NaN (clip_benchmark's value), which the table says in words.
    folder = image_folder(tmp_path / "set", per_class=1, seed=2)
    for d in sorted(folder.iterdir())[4:]:
        shutil.rmtree(d)
    code, out, err = run(capsys, "zero-shot", folder, "--model", tiny_ckpt, "--workers", "0")
    assert code == 0, err
    assert "nan" not in out
    assert re.search(r"^acc@5 +n/a  \(fewer than 5 classes: every image would count\)$", out, re.M), out
    assert re.search(r"^acc@1 +\d+\.\d\d%$", out, re.M), out


def test_a_missing_data_path_is_named_as_missing(capsys, tiny_ckpt, tmp_path):
    for task, name in (("zero-shot", "nope"), ("zero-shot", "nope.csv"), ("retrieval", "pairs.parquet")):
        code, _, err = run(capsys, task, tmp_path / name, "--model", tiny_ckpt)
        assert code == 1 and err.strip() == f"error: {tmp_path / name}: no such file or folder", err
