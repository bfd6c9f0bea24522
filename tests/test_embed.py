"""Embedding a collection: the embeddings equal encode_image, bad images are recorded and counted,
a killed run resumes to the same bytes, torchrun with 2 and 3 processes writes the bytes one
process writes, webdataset/parquet/CSV/txt inputs, and the lock."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import bf16_is_native
from PIL import Image

import siglip_so400m
from siglip_so400m.embedding import EmbedError, _Lock

ROOT = Path(__file__).parents[1]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """JPEGs and PNGs of mixed sizes and modes, with some structure so embeddings differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        w, h = rng.randint(16, 120), rng.randint(16, 120)
        arr = np.random.default_rng(seed * 1000 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if i % 5 == 3:
            img = img.convert("L")
        path = folder / f"img_{i:03d}.{'png' if i % 4 == 0 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    make_images(folder, 23)
    (folder / "img_050_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = folder / "img_001.jpg"
    (folder / "img_051_truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "img_052_text.png").write_text("hello")
    return folder


def all_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_cli(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "siglip_so400m"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "siglip_so400m"]
    return subprocess.run([*launcher, "embed", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def common(ckpt: Path, out: Path) -> list[str]:
    return ["--model", str(ckpt), "--output", str(out), "--dtype", "float32", "--part-size", "5",
            "--batch-size", "3", "--threads", "1"]


def part(out: Path, kind: str, i: int) -> Path:
    """Part i's file: the number zero-padded to 6 digits, so that name order is part order."""
    return out / kind / f"{kind}_{i:06d}.{'npy' if kind.endswith('_emb') else 'parquet'}"


def read_all(out: Path) -> tuple[np.ndarray, list[dict], list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    embs, meta, errors = [], [], []
    for i in range(manifest["parts"]):
        embs.append(np.load(part(out, "img_emb", i)))
        rows = pq.read_table(part(out, "metadata", i)).to_pylist()
        assert len(rows) == len(embs[-1])  # row-aligned, part by part, as embedding-reader pairs them
        meta += rows
        errors += pq.read_table(part(out, "errors", i)).to_pylist()
    return np.concatenate(embs), meta, errors


def test_embeddings_equal_encode_image_and_bad_files_are_recorded_and_counted(tiny_ckpt, photos, tmp_path):
    out = tmp_path / "out"
    manifest = siglip_so400m.embed(photos, out, model=str(tiny_ckpt), dtype="float32", part_size=7,
                                   batch_size=4, workers=2)
    emb, meta, errors = read_all(out)
    assert manifest["counts"]["images"] == 23 and manifest["counts"]["errors"] == 3
    assert manifest["parts"] == 4 and manifest["complete"]
    assert sorted(Path(e["image_path"]).name for e in errors) == [
        "img_050_broken.jpg", "img_051_truncated.jpg", "img_052_text.png"]
    assert all(e["error"] and e["image_path"] in e["error"] for e in errors)
    assert emb.dtype == np.float16 and emb.shape == (23, 64)
    model, proc = siglip_so400m.load(tiny_ckpt)
    paths = [m["image_path"] for m in meta]
    assert paths == sorted(str(p) for p in photos.glob("img_0[0-2]*"))
    with torch.no_grad():
        ref = model.encode_image(proc.images(paths), normalize=True).numpy()
    # float16 rounding: half an ulp at |x| < 1 is below 2**-12
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2**-11, rtol=0)
    sizes = {str(p): Image.open(p).size for p in photos.glob("img_0[0-2]*")}
    assert all((m["width"], m["height"]) == sizes[m["image_path"]] for m in meta)
    assert manifest["logit_scale"] == pytest.approx(model.logit_scale.item(), abs=0)
    assert manifest["logit_bias"] == pytest.approx(model.logit_bias.item(), abs=0)


def test_an_image_embeds_the_same_in_any_batch(tiny_ckpt, photos, tmp_path):
    """Fixed batches are the rule; this checks the model really gives an image one answer whatever
    batch it is in (the CPU tower runs image by image), so part boundaries cannot change bytes."""
    a = siglip_so400m.embed(photos, tmp_path / "a", model=str(tiny_ckpt), dtype="float32", part_size=100,
                            batch_size=1, workers=0)
    b = siglip_so400m.embed(photos, tmp_path / "b", model=str(tiny_ckpt), dtype="float32", part_size=100,
                            batch_size=8, workers=0)
    assert a["counts"] == b["counts"]
    assert np.array_equal(read_all(tmp_path / "a")[0], read_all(tmp_path / "b")[0])


@pytest.mark.parametrize("kill", [{"SIGLIP_SO400M_KILL_AFTER_IMAGES": "8"},
                                  {"SIGLIP_SO400M_KILL_IN_COMMIT": "2"}])
def test_a_killed_run_resumes_to_the_same_bytes(tiny_ckpt, photos, tmp_path, kill):
    whole = run_cli([str(photos), *common(tiny_ckpt, tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    cut = run_cli([str(photos), *common(tiny_ckpt, tmp_path / "cut"), "--workers", "2"], env=kill)
    assert cut.returncode == -9, cut.stderr  # SIGKILL: no cleanup ran
    partial = all_bytes(tmp_path / "cut")
    assert any(".tmp" in name for name in partial) or len(partial) < len(all_bytes(tmp_path / "whole"))
    again = run_cli([str(photos), *common(tiny_ckpt, tmp_path / "cut")])
    assert again.returncode == 0, again.stderr
    assert re.search(r"\(\d+ embedded now, 1 part was already done\)", again.stderr), again.stderr
    assert all_bytes(tmp_path / "cut") == all_bytes(tmp_path / "whole")


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_processes_write_the_bytes_one_process_writes(tiny_ckpt, photos, tmp_path, nproc):
    one = run_cli([str(photos), *common(tiny_ckpt, tmp_path / "one")])
    many = run_cli([str(photos), *common(tiny_ckpt, tmp_path / "many"), "--workers", "1"], nproc=nproc)
    assert one.returncode == 0, one.stderr
    assert many.returncode == 0, many.stderr
    a, b = all_bytes(tmp_path / "one"), all_bytes(tmp_path / "many")
    assert len(a) == 1 + 3 * 6 and a == b  # manifest + 6 parts of errors, img_emb, metadata


@pytest.mark.parametrize("rank1", [("", "--part-size 6"), ("", "--dtype bfloat16"), ("nope/", "")],
                         ids=["part_size", "dtype", "missing_input"])
def test_torchrun_ranks_that_differ_from_rank_0_all_stop_with_one_message(tiny_ckpt, photos, tmp_path,
                                                                         rank1):
    """Each rank reads the inputs and picks its dtype itself (a node with other files, another
    GPU): rank 1 gets other arguments here (an input before, options after the common ones),
    through a wrapper that torchrun runs on both ranks."""
    wrapper = tmp_path / "rank1_differs.sh"
    cmd = f'exec "{sys.executable}" -m siglip_so400m embed'
    wrapper.write_text(f'if [ "$RANK" = 1 ]; then {cmd} {rank1[0]} "$@" {rank1[1]}; else {cmd} "$@"; fi\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--no-python", "sh", str(wrapper), str(photos), *common(tiny_ckpt, out),
                        "--workers", "0"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("ranks do not agree, so none starts") == 1, r.stderr
    expected = {"part_size": "rank 1 differs from rank 0: part_size 6 (rank 0: 5)",
                "dtype": "rank 1 differs from rank 0: dtype 'bfloat16' (rank 0: 'float32')",
                "missing_input": "rank 1: nope/: no such file or folder"}
    assert any(v in r.stderr for v in expected.values()), r.stderr
    assert not out.exists()  # nothing written: the ranks compared before rank 0 made the folder


def test_a_second_run_on_the_same_folder_refuses(tiny_ckpt, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = _Lock(out)  # as a running embed holds it
    try:
        r = run_cli([str(photos), *common(tiny_ckpt, out)])
        assert r.returncode == 1 and "in use by another embed run" in r.stderr
        assert not (out / "img_emb").exists()
    finally:
        held.release()
    r = run_cli([str(photos), *common(tiny_ckpt, out)])
    assert r.returncode == 0, r.stderr
    # A rerun with other settings would mix two runs' parts: refused, naming what differs.
    r = run_cli([str(photos), *common(tiny_ckpt, out), "--part-size", "6"])
    assert r.returncode == 2 and "part_size: 5 there, 6 now" in r.stderr


def test_a_missing_input_or_a_list_of_no_paths_is_a_usage_error_and_writes_nothing(tiny_ckpt, photos,
                                                                                   tmp_path):
    out = tmp_path / "out"
    r = run_cli([str(photos / "nope"), *common(tiny_ckpt, out)])
    assert r.returncode == 2 and f"{photos / 'nope'}: no such file or folder" in r.stderr, r.stderr
    assert not out.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("buy milk\ncall Ann about the photos\n")
    r = run_cli([str(notes), *common(tiny_ckpt, out)])
    assert r.returncode == 2 and "not one of its 2 entries is an existing file (the first: 'buy milk')" \
        in r.stderr, r.stderr
    assert not out.exists()
    # The corrected command then runs: nothing was left behind to refuse it.
    r = run_cli([str(photos), *common(tiny_ckpt, out)])
    assert r.returncode == 0, r.stderr


def test_output_that_is_a_file_is_a_usage_error_and_the_summary_counts_in_english(tiny_ckpt, photos,
                                                                                  tmp_path, capsys):
    from siglip_so400m.embedding import main

    (tmp_path / "emb.npy").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        main([str(photos / "img_001.jpg"), *common(tiny_ckpt, tmp_path / "emb.npy"), "--workers", "0"])
    err = capsys.readouterr().err
    emb = tmp_path / "emb.npy"
    assert e.value.code == 2 and f"--output {emb}: {emb} is a file, not a folder" in err, err
    assert "Errno" not in err
    assert main([str(photos / "img_001.jpg"), *common(tiny_ckpt, tmp_path / "one"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "embedded 1 image into 1 part in" in err and "0 parts were already done); 0 bad images" in err, err
    assert main([str(photos / "img_001.jpg"), *common(tiny_ckpt, tmp_path / "one"), "--workers", "0"]) == 0
    assert "(0 embedded now, 1 part was already done)" in capsys.readouterr().err


def test_a_filesystem_without_flock_says_so_and_no_lock_runs(tiny_ckpt, photos, tmp_path, capsys,
                                                             monkeypatch):
    import errno
    import fcntl

    from siglip_so400m import embedding

    def no_flock(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without -o flock

    monkeypatch.setattr(fcntl, "flock", no_flock)
    args = [str(photos / "img_001.jpg"), *common(tiny_ckpt, tmp_path / "out"), "--workers", "0"]
    assert embedding.main(args) == 1
    err = capsys.readouterr().err
    assert "its filesystem does not support flock ([Errno 38] Function not implemented; e.g. Lustre" in err
    assert "run again with --no-lock" in err, err
    assert embedding.main([*args, "--no-lock"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_each_part_file_is_fsynced_before_its_rename_through_the_one_atomic_write(tiny_ckpt, photos,
                                                                                tmp_path, monkeypatch):
    """A power cut after a rename must not leave a done-looking part with a truncated img_emb:
    each file's data is flushed before its new name exists, and its folder after."""
    from siglip_so400m import collection, train, weights, zeroshot

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = (tmp_path / "out").resolve()
    siglip_so400m.embed(photos, out, model=str(tiny_ckpt), dtype="float32", part_size=10, workers=0)
    renames = [e for e in events if e[0] == "replace"]
    finals = [r[1].split(" -> ")[1] for r in renames]
    for i in range(3):
        for kind in ("errors", "img_emb", "metadata"):
            assert str(part(out, kind, i)) in finals
    for n, (what, arrow) in enumerate(events):
        if what != "replace":
            continue
        src, dst = arrow.split(" -> ")
        assert ("fsync", src) in events[:n], f"{src} renamed unflushed"
        assert ("fsync", str(Path(dst).parent)) in events[n + 1 :], f"{Path(dst).parent} not flushed"
    # The metadata, whose presence marks a part done, is renamed after the part's other files.
    for i in range(3):
        order = [f for f in finals if f"_{i:06d}." in f]
        assert order[-1] == str(part(out, "metadata", i)), order
    assert all(getattr(m, "atomic_write", None) is weights.atomic_write
               for m in (collection, train, zeroshot))


def write_shard(path: Path, images: list[Path], captions: list[str], fields: list[dict] | None = None
                ) -> None:
    with tarfile.open(path, "w") as tar:
        for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
            extra = json.dumps(fields[i] if fields else {"key": f"{i:09d}"}).encode()
            for name, data in ((f"{i:09d}{img.suffix}", img.read_bytes()),
                               (f"{i:09d}.txt", caption.encode()),
                               (f"{i:09d}.json", extra)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_are_one_part_each_with_captions(tiny_ckpt, photos, tmp_path):
    imgs = sorted(photos.glob("img_0[0-2]*"))
    write_shard(tmp_path / "00000.tar", imgs[:4], [f"caption {i}" for i in range(4)])
    write_shard(tmp_path / "00001.tar", [*imgs[4:6], photos / "img_050_broken.jpg"], ["x", "y", "z"])
    (tmp_path / "00002.tar").write_bytes(b"not a tar")
    out = tmp_path / "out"
    manifest = siglip_so400m.embed(str(tmp_path / "*.tar"), out, model=str(tiny_ckpt), dtype="float32",
                                   captions=True, workers=1)
    assert manifest["parts"] == 3 and manifest["counts"]["per_part"] == [[4, 0], [2, 1], [0, 1]]
    emb, meta, errors = read_all(out)
    assert [m["key"] for m in meta] == ["000000000", "000000001", "000000002", "000000003",
                                        "000000000", "000000001"]
    assert meta[0]["shard"].endswith("00000.tar") and meta[0]["caption"] == "caption 0"
    assert "00002.tar" in errors[1]["error"] and errors[0]["key"] == "000000002"
    model, proc = siglip_so400m.load(tiny_ckpt)
    with torch.no_grad():
        ref = model.encode_image(proc.images([*imgs[:4], *imgs[4:6]]), normalize=True).numpy()
        txt = model.encode_text(proc.texts([m["caption"] for m in meta]), normalize=True).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2**-11, rtol=0)
    text = np.concatenate([np.load(part(out, "text_emb", i)) for i in range(3)])
    np.testing.assert_allclose(text.astype(np.float32), txt, atol=2**-11, rtol=0)


def test_embedding_reader_reads_our_rows_in_our_id_order_with_11_shards(tiny_ckpt, photos, tmp_path):
    """embedding-reader (and autofaiss, which reads through it) takes the files in name order: with
    11 parts, unpadded names would put part 10 before part 2 and its ids on other images than ours."""
    from embedding_reader import EmbeddingReader

    imgs = sorted(photos.glob("img_0[0-2]*"))
    for s in range(11):
        write_shard(tmp_path / f"{s:05d}.tar", imgs[2 * s : 2 * s + 2], [f"shard {s} a", f"shard {s} b"])
    out = tmp_path / "out"
    manifest = siglip_so400m.embed(str(tmp_path / "*.tar"), out, model=str(tiny_ckpt), dtype="float32",
                                   workers=0)
    assert manifest["parts"] == 11 and manifest["counts"]["images"] == 22
    index = siglip_so400m.Index.load(out)
    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                             metadata_folder=str(out / "metadata"), meta_columns=["shard", "key"])
    assert reader.count == len(index) == 22
    seen = []
    for emb, meta in reader(batch_size=5, show_progress=False):
        ids = meta["i"].to_numpy()
        seen += ids.tolist()
        # Their row i is our id i: the same vector bit for bit, the same image.
        np.testing.assert_array_equal(emb.astype(np.float32), index.collection.vectors(ids))
        for i, shard, key in zip(ids, meta["shard"], meta["key"], strict=True):
            ours = index.collection.metadata(int(i))
            assert (ours["shard"], ours["key"]) == (shard, key)
    assert sorted(seen) == list(range(22))
    # And our ids follow the inputs: shard s holds ids 2s, 2s + 1.
    assert [Path(index.collection.metadata(i)["shard"]).name for i in range(22)] == [
        f"{i // 2:05d}.tar" for i in range(22)]
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i:06d}.npy" for i in range(11)]


def test_a_rerun_continues_an_unpadded_folder_and_index_reads_one(tiny_ckpt, photos, tmp_path):
    """Folders written before the padding (img_emb_3.npy, no part_digits in the manifest) still
    open in Index, and a rerun renames their parts and finishes with the bytes of a fresh run."""
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    siglip_so400m.embed(photos, fresh, model=str(tiny_ckpt), dtype="float32", part_size=7, workers=0)
    siglip_so400m.embed(photos, old, model=str(tiny_ckpt), dtype="float32", part_size=7, workers=0)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["part_digits"]
    for f in sorted(old.glob("*/*_0000*")):  # back to the old names: img_emb_3.npy
        f.rename(f.with_name(re.sub(r"_0+(\d)", r"_\1", f.name)))
    assert (old / "img_emb" / "img_emb_3.npy").is_file() and not list(old.glob("*/*_0000*"))
    (old / "manifest.json").write_text(json.dumps(manifest))
    a, b = siglip_so400m.Index.load(fresh), siglip_so400m.Index.load(old)
    assert len(a) == len(b) == 23
    np.testing.assert_array_equal(a.collection.vectors(np.arange(23)), b.collection.vectors(np.arange(23)))
    assert [a.collection.metadata(i) for i in range(23)] == [b.collection.metadata(i) for i in range(23)]
    # An interrupted old run: its last part unwritten, the manifest not complete.
    for f in old.glob("*/*_3.*"):
        f.unlink()
    (old / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    siglip_so400m.embed(photos, old, model=str(tiny_ckpt), dtype="float32", part_size=7, workers=0)
    assert all_bytes(old) == all_bytes(fresh)


def test_img2dataset_json_fields_become_metadata_columns_and_image_path_names_the_member(
        tiny_ckpt, photos, tmp_path):
    """As clip-retrieval does: the fields of {key}.json (url, status, exif, ...) are metadata
    columns people filter on; nested objects flattened as pandas.json_normalize does."""
    imgs = sorted(photos.glob("img_0[0-2]*"))[:3]
    fields = [{"url": f"https://example.com/{i}.jpg", "key": f"{i:09d}", "caption": "from json",
               "status": "success", "width": 9, "original_width": 640 + i, "exif": {"Make": "Canon"}}
              for i in range(3)]
    fields[2]["original_width"] = "unknown"  # mixed types: the column falls back to JSON text
    write_shard(tmp_path / "00000.tar", imgs, ["a", "b", "c"], fields)
    out = tmp_path / "out"
    siglip_so400m.embed(tmp_path / "00000.tar", out, model=str(tiny_ckpt), dtype="float32", workers=1)
    table = pq.read_table(part(out, "metadata", 0))
    assert table.column_names == ["image_path", "shard", "key", "caption", "width", "height", "url",
                                  "status", "original_width", "exif.Make"]
    rows = table.to_pylist()
    assert [r["url"] for r in rows] == [f"https://example.com/{i}.jpg" for i in range(3)]
    assert [r["exif.Make"] for r in rows] == ["Canon"] * 3 and rows[0]["status"] == "success"
    assert [r["original_width"] for r in rows] == ["640", "641", '"unknown"']
    # Ours win where the json says the same thing: the caption of the .txt, the measured size.
    assert [r["caption"] for r in rows] == ["a", "b", "c"]
    assert [(r["width"], r["height"]) for r in rows] == [Image.open(p).size for p in imgs]
    assert [r["image_path"] for r in rows] == [f"{tmp_path / '00000.tar'}/{i:09d}{p.suffix}"
                                               for i, p in enumerate(imgs)]
    hit = siglip_so400m.Index.load(out).search(vectors=np.load(part(out, "img_emb", 0))[1], k=1)[0][0]
    assert hit["path"] == rows[1]["image_path"] and hit["metadata"]["url"] == "https://example.com/1.jpg"


def test_parquet_csv_and_txt_lists(tiny_ckpt, photos, tmp_path):
    imgs = sorted(photos.glob("img_00*"))[:5]
    rows = [{"image_path": str(p), "caption": f"c{i}"} for i, p in enumerate(imgs)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("image,caption\n" + "".join(f"{p},c{i}\n" for i, p in enumerate(imgs)))
    (tmp_path / "list.txt").write_text("".join(f"{p.relative_to(photos.parent)}\n" for p in imgs))
    (tmp_path / "list.txt").rename(photos.parent / "list.txt")  # relative to the list's folder
    results = {}
    for name, source in (("parquet", tmp_path / "list.parquet"), ("csv", tmp_path / "list.csv"),
                         ("txt", photos.parent / "list.txt")):
        siglip_so400m.embed(source, tmp_path / name, model=str(tiny_ckpt), dtype="float32", workers=0)
        results[name] = read_all(tmp_path / name)
    for name in ("parquet", "csv"):
        assert [m["caption"] for m in results[name][1]] == [f"c{i}" for i in range(5)]
    assert [Path(m["image_path"]).name for m in results["txt"][1]] == [p.name for p in imgs]
    assert np.array_equal(results["parquet"][0], results["csv"][0])
    assert np.array_equal(results["parquet"][0], results["txt"][0])
    (tmp_path / "bad.csv").write_text("photo,label\nx,y\n")
    with pytest.raises(EmbedError, match=r"needs an image column .* found: photo, label"):
        siglip_so400m.embed(tmp_path / "bad.csv", tmp_path / "bad", model=str(tiny_ckpt))


def test_embed_and_fine_tuning_read_the_same_columns_of_one_csv(tmp_path):
    """A CSV with several candidate columns (image and image_path, caption and text) names the same
    images and captions to embed's list reader and to fine-tuning's."""
    from siglip_so400m.data import read_pairs
    from siglip_so400m.items import read_list

    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(b"")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("image,path,image_path,text,caption\na.jpg,c.jpg,b.jpg,t1,c1\nc.jpg,a.jpg,d.jpg,t2,c2\n")
    pairs = read_pairs(csv_file)
    items = read_list(csv_file)
    assert [(Path(i.path), i.caption) for i in items] == [(p, c) for p, c in pairs]
    assert [p.name for p, _ in pairs] == ["b.jpg", "d.jpg"]  # image_path: clip-retrieval's name
    assert [c for _, c in pairs] == ["c1", "c2"]


def test_import_pulls_in_neither_pyarrow_nor_faiss():
    code = ("import sys, siglip_so400m; assert callable(siglip_so400m.embed) and siglip_so400m.Index; "
            "print(sorted(m for m in ('pyarrow', 'faiss') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_so400m_embeddings_equal_encode_image(so400m_ckpt, tmp_path, dtype):
    """The full-size shape (1152-d): embed's rows equal encode_image's, in fp32 and in bf16."""
    if dtype == "bfloat16" and not bf16_is_native():
        pytest.skip("this CPU has no native bf16: torch emulates it about 30x slower than fp32 (minutes "
                    "a 384 px image at full size), and embed picks fp32 here; the bf16 embed path is "
                    "tested on the tiny model, and at full size on CPUs with AVX512-BF16 or AMX")
    paths = make_images(tmp_path / "imgs", 2, seed=9)
    model, proc = siglip_so400m.load(so400m_ckpt, towers=("vision",))
    with torch.no_grad():
        ref = model.encode_image(proc.images(paths), normalize=True).numpy()
    del model
    atol = 2**-11 if dtype == "float32" else 2e-2
    out = tmp_path / dtype
    m = siglip_so400m.embed(tmp_path / "imgs", out, model=str(so400m_ckpt), dtype=dtype, workers=1)
    assert m["counts"]["images"] == 2 and m["embedding_dim"] == 1152 and m["image_size"] == 384
    emb = np.load(part(out, "img_emb", 0))
    assert emb.shape == (2, 1152) and emb.dtype == np.float16
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=atol, rtol=0)
    cos = (emb.astype(np.float32) * ref).sum(1) / np.linalg.norm(emb.astype(np.float32), axis=1)
    assert cos.min() > (0.99999 if dtype == "float32" else 0.999)
