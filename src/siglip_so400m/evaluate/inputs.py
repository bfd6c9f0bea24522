"""Evaluation sets read from disk: labelled images for zero-shot classification, image-caption pairs
for retrieval, and the standard class lists and prompt ensembles shipped with the package.

Images are embed's `Item`s (a file, or a member of a webdataset .tar), so that eval decodes them
with embed's own code and can match them to the rows of an `embed` output folder.
"""

from __future__ import annotations

import csv
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import DEFAULT_TEMPLATE
from ..errors import SiglipError
from ..image import IMAGE_COLUMNS, IMAGE_SUFFIXES
from ..items import Item
from ..text import is_prompt_template

LABEL_COLUMNS = ("label", "class", "cls", "target", "category")
CAPTION_COLUMNS = ("caption", "captions", "text")
_SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", *sorted(s[1:] for s in IMAGE_SUFFIXES))

# The standard ensembles, package data (evaluate/ensembles/). Source: clip_benchmark 1.6.2,
# clip_benchmark/datasets/en_classnames.json ("imagenet1k") and en_zeroshot_classification_templates.json
# ("imagenet1k"): the class names OpenAI curated for CLIP and open_clip ships as IMAGENET_CLASSNAMES, and
# CLIP's 80 ImageNet prompts (open_clip's OPENAI_IMAGENET_TEMPLATES), `{c}` written as `{}`. These are
# what clip_benchmark scores ImageNet-1k and ImageNet-v2 with, so the published numbers used them. The
# list names two classes twice ("missile", "sunglasses"), as CLIP's does: each pair gets one embedding
# and every tool that uses the list loses the same images to it.
CLASS_LISTS = {"imagenet1k": "imagenet1k_classes.txt"}
TEMPLATE_SETS = {"imagenet": "imagenet_templates.txt", "siglip": None}  # siglip: DEFAULT_TEMPLATE alone


class EvalError(SiglipError, ValueError):
    """An evaluation set, class list or template that cannot be used; the message says what to fix."""


@dataclass
class LabelledSet:
    """Images with one class each: items[i] is of class classes[targets[i]]."""

    items: list[Item]
    targets: list[int]
    classes: list[str]


@dataclass
class PairSet:
    """Images with one or more captions each: captions[i] are those of items[i]."""

    items: list[Item]
    captions: list[list[str]]


def item_name(item: Item) -> str:
    return item.path if item.path is not None else f"{item.shard}/{item.key}"


def _shipped(name: str) -> list[str]:
    text = resources.files(__package__).joinpath("ensembles", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _read_lines(path: str | Path, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read the {what} {path}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_templates(templates: str | Path | Sequence[str] | None) -> list[str]:
    """A shipped ensemble by name ("imagenet", "siglip"), a file (one template a line) or a list;
    None is SigLIP's default prompt. Every template must hold exactly one `{}`."""
    if templates is None:
        out = [DEFAULT_TEMPLATE]
    elif isinstance(templates, str) and templates in TEMPLATE_SETS:
        out = _shipped(TEMPLATE_SETS[templates]) if TEMPLATE_SETS[templates] else [DEFAULT_TEMPLATE]
    elif isinstance(templates, (str, Path)):
        if not Path(templates).is_file():
            raise EvalError(f"templates {str(templates)!r}: neither a shipped ensemble "
                            f"({', '.join(TEMPLATE_SETS)}) nor a file")
        out = _read_lines(templates, "templates file")
        if not out:
            raise EvalError(f"the templates file {templates} holds no template")
    else:
        out = list(templates)
        if not out:
            raise EvalError("no templates given")
    for t in out:
        if not is_prompt_template(t):
            raise EvalError(f"template {t!r} must hold one {{}} where the class name goes (and no other "
                            "braces), e.g. 'a photo of a {}.'")
    return out


def read_classes(classes: str | Path | Sequence[str] | None) -> list[str] | dict[str, str] | None:
    """A shipped list by name ("imagenet1k"), a file or a list. A file's lines are the class names in
    order (for an ImageFolder: of its sorted folders), or `folder<TAB>name` lines mapping folder names."""
    if classes is None:
        return None
    if isinstance(classes, str) and classes in CLASS_LISTS:
        return _shipped(CLASS_LISTS[classes])
    if isinstance(classes, (str, Path)):
        if not Path(classes).is_file():
            raise EvalError(f"classes {str(classes)!r}: neither a shipped list ({', '.join(CLASS_LISTS)}) "
                            "nor a file")
        lines = _read_lines(classes, "classes file")
        if not lines:
            raise EvalError(f"the classes file {classes} holds no class name")
        if all("\t" in line for line in lines):
            return {k.strip(): v.strip() for k, v in (line.split("\t", 1) for line in lines)}
        return lines
    out = list(classes)
    if not out or any(not isinstance(c, str) or not c.strip() for c in out):
        raise EvalError("classes must be a non-empty list of non-empty strings")
    return out


# --- zero-shot classification sets ----------------------------------------------------------

def read_labelled(data: str | Path, classes: list[str] | dict[str, str] | None = None) -> LabelledSet:
    """An ImageFolder (one folder per class), a .csv/.parquet with an image and a label column, or
    webdataset .tar shards (a folder of them, one, or a glob) whose samples carry a `cls` member."""
    shards = _shards(data)
    if shards:
        return _labelled_shards(shards, classes)
    path = _existing(data)
    if path.is_dir():
        return _image_folder(path, classes)
    if path.suffix.lower() in (".csv", ".parquet") and path.is_file():
        return _labelled_table(path, classes)
    raise EvalError(f"{data}: expected an ImageFolder (one folder per class), a .csv or .parquet with an "
                    "image and a label column, or webdataset .tar shards")


def _existing(data: str | Path) -> Path:
    """A path that is there: a typo gets "no such file", not a list of the layouts eval reads."""
    path = Path(data)
    if not path.exists():
        raise EvalError(f"{data}: no such file or folder")
    return path


def _shards(data: str | Path) -> list[Path]:
    import glob

    spec = str(data)
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if not path.exists() and glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec) if p.endswith(".tar"))
        if not found:
            raise EvalError(f"{spec}: no .tar shards match this pattern")
        return found
    if path.suffix.lower() == ".tar":
        if not path.is_file():
            raise EvalError(f"{spec}: no such file")
        return [path]
    return []


def _image_folder(root: Path, classes: list[str] | dict[str, str] | None) -> LabelledSet:
    # torchvision's ImageFolder order: class folders sorted by name, files sorted within each (any depth).
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise EvalError(f"{root}: no class folders in it (an ImageFolder has one folder of images per "
                        "class)")
    names = [d.name for d in folders]
    if isinstance(classes, dict):
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise EvalError(f"class folder {root / unknown[0]} is not in the classes file "
                            f"({len(unknown)} folders are not: {', '.join(unknown[:5])})")
        names = [classes[n] for n in names]
    elif classes is not None:
        if len(classes) != len(folders):
            raise EvalError(f"{root} has {len(folders)} class folders but the class list has "
                            f"{len(classes)} names; give one name per folder, in the folders' sorted order "
                            "(or folder<TAB>name lines)")
        names = list(classes)
    items, targets = [], []
    for k, d in enumerate(folders):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise EvalError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "remove it or add its images")
        items += [Item(path=str(f)) for f in files]
        targets += [k] * len(files)
    return LabelledSet(items, targets, names)


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return list(reader), list(reader.fieldnames or [])
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalError("reading .parquet needs pyarrow: pip install 'siglip_so400m[embed]'") from None
        table = pq.read_table(path)
        return table.to_pylist(), table.column_names
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def _image_column(path: Path, columns: list[str]) -> str:
    col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if col is None:
        raise EvalError(f"{path}: needs an image column ({' / '.join(IMAGE_COLUMNS)}); found: "
                        f"{', '.join(columns) or 'none'}")
    return col


def _item(table: Path, value) -> Item:
    p = Path(str(value))
    return Item(path=str(p if p.is_absolute() else table.parent / p))  # relative to the table's folder


def _labelled_table(path: Path, classes: list[str] | dict[str, str] | None) -> LabelledSet:
    rows, columns = _read_table(path)
    image_col = _image_column(path, columns)
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_col is None:
        raise EvalError(f"{path}: needs a label column ({' / '.join(LABEL_COLUMNS)}); found: "
                        f"{', '.join(columns)}")
    rows = [r for r in rows if r.get(image_col)]
    if not rows:
        raise EvalError(f"{path}: no rows with an image path")
    labels = [r[label_col] for r in rows]
    if isinstance(classes, dict):
        classes = list(dict.fromkeys(classes.values()))
    if classes is None:
        # Labels read as text (CSV) and as integers (a parquet int column) are the same labels: both
        # become their decimal text, and whole numbers sort as numbers (0, 1, 2, ..., 10), not as text
        # (0, 1, 10, 2), so that class k is label k where the labels count from 0.
        names = {_label_text(v) for v in labels}
        numeric = all(n.isdigit() for n in names)
        classes = sorted(names, key=int) if numeric else sorted(names)
        if numeric:
            warnings.warn(f"{path}: the labels are numbers, so the prompts name the classes by them "
                          f"('{classes[-1]}' where a class name goes); give --classes FILE, one name a line "
                          "in label order, for prompts that name the classes", stacklevel=2)
        labels = [_label_text(v) for v in labels]
    index = {name: k for k, name in reversed(list(enumerate(classes)))}  # a name listed twice: its first
    targets = []
    for n, v in enumerate(labels):
        k = index.get(str(v))
        if k is None and (isinstance(v, int) or str(v).strip().isdigit()) and int(v) < len(classes):
            k = int(v)  # an index into the class list
        if k is None:
            raise EvalError(f"{path}, row {n + 1}: label {v!r} is not in the class list ({len(classes)} "
                            f"classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        targets.append(k)
    return LabelledSet([_item(path, r[image_col]) for r in rows], targets, list(classes))


def _label_text(value) -> str:
    """A label as text: 7 from a parquet int column and "7" from a CSV are one label."""
    return str(value).strip() if not isinstance(value, bool) else str(value)


def _scan(shard: Path, want: str) -> list[tuple[str, tarfile.TarInfo | None, bytes | None]]:
    """(key, image member, bytes of the `want` member) per sample of a webdataset tar, in order."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    out = []
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, dot, ext = m.name.rpartition(".")
                    if dot:
                        samples.setdefault(key, {})[ext.lower()] = m
            for key, members in samples.items():
                image = next((members[e] for e in _SHARD_IMAGE_EXTS if e in members), None)
                value = tar.extractfile(members[want]).read() if want in members else None
                out.append((key, image, value))
    except (OSError, tarfile.TarError) as e:
        raise EvalError(f"cannot read the tar shard {shard}: {e}") from None
    return out


def _shard_item(shard: Path, key: str, image: tarfile.TarInfo | None) -> Item:
    if image is None:
        raise EvalError(f"{shard}: sample {key!r} has no image member")
    return Item(shard=str(shard), key=key, offset=image.offset_data, size=image.size)


def _labelled_shards(shards: list[Path], classes: list[str] | dict[str, str] | None) -> LabelledSet:
    if isinstance(classes, dict):
        raise EvalError("webdataset `cls` values are class indices: give the class names one a line, "
                        "in index order, not folder<TAB>name lines")
    if classes is None:
        # clip_benchmark's webdataset layout keeps the names in classnames.txt beside the shards' folder.
        for folder in (shards[0].parent, shards[0].parent.parent):
            if (folder / "classnames.txt").is_file():
                classes = _read_lines(folder / "classnames.txt", "class names")
                break
        else:
            raise EvalError(f"{shards[0].parent}: no classnames.txt beside the shards; give --classes FILE")
    items, targets = [], []
    for shard in shards:
        for key, image, cls in _scan(shard, "cls"):
            if cls is None:
                raise EvalError(f"{shard}: sample {key!r} has no .cls member (its class index)")
            text = cls.decode("utf-8", "replace").strip()
            if not text.isdigit() or int(text) >= len(classes):
                raise EvalError(f"{shard}: sample {key!r} has label {text!r}, which is not in the class list "
                                f"(indices 0 to {len(classes) - 1})")
            items.append(_shard_item(shard, key, image))
            targets.append(int(text))
    if not items:
        raise EvalError(f"no samples in {', '.join(map(str, shards[:3]))}")
    return LabelledSet(items, targets, list(classes))


# --- retrieval sets -----------------------------------------------------------------------

def read_pairs(data: str | Path) -> PairSet:
    """Image-caption pairs: a .csv/.parquet with an image and a caption column (an image on several rows
    has several captions; a parquet list column holds several too), or webdataset shards whose `.txt`
    member holds an image's captions one a line (clip_benchmark's layout for COCO and Flickr)."""
    shards = _shards(data)
    captions: dict[str, list[str]] = {}
    items: dict[str, Item] = {}
    if shards:
        for shard in shards:
            for key, image, txt in _scan(shard, "txt"):
                item = _shard_item(shard, key, image)
                lines = (txt or b"").decode("utf-8", "replace").splitlines()
                captions[item_name(item)] = [c.strip() for c in lines if c.strip()]
                items[item_name(item)] = item
    else:
        path = _existing(data)
        if path.suffix.lower() not in (".csv", ".parquet") or not path.is_file():
            raise EvalError(f"{data}: expected a .csv or .parquet of image-caption pairs, or webdataset "
                            ".tar shards")
        rows, columns = _read_table(path)
        image_col = _image_column(path, columns)
        caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_col is None:
            raise EvalError(f"{path}: needs a caption column ({' / '.join(CAPTION_COLUMNS)}); found: "
                            f"{', '.join(columns)}")
        for r in rows:
            if not r.get(image_col):
                continue
            item = _item(path, r[image_col])
            value = r.get(caption_col)
            texts = value if isinstance(value, list) else [value]
            items.setdefault(item_name(item), item)
            captions.setdefault(item_name(item), []).extend(
                str(c).strip() for c in texts if c is not None and str(c).strip())
    if not items:
        raise EvalError(f"{data}: no images in it")
    empty = [name for name, c in captions.items() if not c]
    if empty:
        raise EvalError(f"{data}: {len(empty)} images have no caption (first: {empty[0]}); every image of a "
                        "retrieval set needs at least one")
    names = list(items)
    return PairSet([items[n] for n in names], [captions[n] for n in names])
