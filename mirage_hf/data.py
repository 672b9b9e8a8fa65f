"""Load real-vs-fake image data sets into `datasets` objects with one schema.

Every loader returns the columns ``image`` (undecoded ``{"path", "bytes"}`` dicts, so that a corrupt file
fails in the collate function, where it can be skipped, instead of inside the loader), ``label``
(``ClassLabel(names=["real", "fake"])``: real = 0, fake = 1 whatever the folder order) and ``subset`` (the
generator or test-set name that per-subset metrics group by).

Folder-based loaders list the files themselves and attach labels explicitly: ``imagefolder`` sorts class
names, which gives fake = 0 and real = 1, and it would decode images while loading.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import (
    ClassLabel,
    Dataset,
    Features,
    Image,
    IterableDataset,
    Value,
    load_dataset,
)

from .configuration_mirage import ID2LABEL, LABEL2ID
from .transforms import IMAGE_EXTENSIONS

LABEL_NAMES = tuple(ID2LABEL[index] for index in sorted(ID2LABEL))  # the model's fixed label set, in id order
REAL, FAKE = LABEL2ID["real"], LABEL2ID["fake"]
# Folder and value names per convention: GenImage uses nature/ai, CNNSpot/UFD use 0_real/1_fake.
LABEL_ALIASES = {"real": REAL, "nature": REAL, "0_real": REAL, "fake": FAKE, "ai": FAKE, "1_fake": FAKE}
FEATURES = Features(
    {"image": Image(decode=False), "label": ClassLabel(names=list(LABEL_NAMES)), "subset": Value("string")}
)
SPLIT_DIR_NAMES = ("train", "val", "validation", "test", "eval")
LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json"}
_IMAGE_VALUE_DTYPES = ("string", "large_string", "binary", "large_binary")  # paths or encoded bytes

_ALIAS_HELP = "real/nature/0_real for real, fake/ai/1_fake for fake, case-insensitive"


def label_from_name(name: str) -> int | None:
    """0 for a real alias, 1 for a fake alias, None for anything else."""
    return LABEL_ALIASES.get(name.strip().lower())


# --------------------------------------------------------------------------- checks and summaries


def class_counts(ds: Dataset) -> dict[str, int]:
    """Number of real and fake rows, e.g. ``{"real": 120, "fake": 118}``."""
    counts = Counter(ds["label"])
    return {name: counts.get(idx, 0) for idx, name in enumerate(LABEL_NAMES)}


def subset_names(ds: Dataset) -> list[str]:
    """Sorted distinct subset (generator / test-set) names."""
    return sorted(set(ds["subset"]))


def check_binary_labels(ds: Dataset | IterableDataset, source: str = "the data set") -> None:
    """Fail fast, before any long work, on data that cannot train or evaluate a binary detector.

    Raises ValueError for an empty data set or one without real or without fake images; warns about subsets
    that miss a class (their AP/AUC are undefined). Streaming data sets are not checked: counting would read
    the whole stream.
    """
    if isinstance(ds, IterableDataset):
        return
    if len(ds) == 0:
        raise ValueError(f"{source} has no images. Check the path and the layout (class folders: {_ALIAS_HELP}).")
    counts = class_counts(ds)
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise ValueError(
            f"{source} has no {missing[0]} images (counts: {counts}); a detector needs both classes. "
            f"Add {missing[0]} images (folder names {_ALIAS_HELP}), point to the right folder or split, "
            "or pass label_column=/label_map= so that labels are read correctly."
        )
    per_subset: dict[str, set[int]] = {}
    for subset, label in zip(ds["subset"], ds["label"], strict=True):
        per_subset.setdefault(subset, set()).add(label)
    one_class = sorted(s for s, labels in per_subset.items() if len(labels) < 2)
    if one_class:
        warnings.warn(
            f"{source}: subsets {one_class} hold only one class; their AP and AUC are undefined.", stacklevel=2
        )


# --------------------------------------------------------------------------- folders


def _labelled_files(directory: Path) -> list[tuple[str, int]]:
    """(absolute path, label) for every image file below `directory` inside a real/fake alias folder.

    The outermost alias folder in the relative path decides the label, so files may be nested at any depth
    (``real/a/b.png``) and class levels may come first (``car/1_fake/x.png``). Hidden files are skipped.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        labels = [label_from_name(part) for part in Path(dirpath).relative_to(directory).parts]
        label = next((label for label in labels if label is not None), None)
        if label is None:
            continue
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((os.path.abspath(os.path.join(dirpath, name)), label))
    return found


def _from_files(files: list[tuple[str, int, str]]) -> Dataset:
    """Build the standard data set from (path, label, subset) rows; images stay undecoded paths."""
    return Dataset.from_dict(
        {
            "image": [{"path": path, "bytes": None} for path, _, _ in files],
            "label": [label for _, label, _ in files],
            "subset": [subset for _, _, subset in files],
        },
        features=FEATURES,
    )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory.")
    return path


def _split_dir(root: Path, split: str | None) -> Path:
    """`root/split`, or `root` itself when no split is asked for and `root` holds no split folders."""
    root = _require_dir(Path(root), "data folder")
    if split is not None:
        if not (root / split).is_dir():
            raise ValueError(f"split {split!r} not found in {str(root)!r} (sub-folders: {_child_dirs(root)}).")
        return root / split
    splits = [d for d in _child_dirs(root) if d.lower() in SPLIT_DIR_NAMES]
    if splits:
        raise ValueError(
            f"{str(root)!r} holds split folders {splits}; pass split= (e.g. split={splits[0]!r}) so that "
            "splits are not mixed."
        )
    return root


def _child_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _no_images_error(directory: Path, layout: str) -> ValueError:
    return ValueError(
        f"no labelled images found under {str(directory)!r} (sub-folders: {_child_dirs(directory)}). "
        f"Expected layout {layout}, with class folder names {_ALIAS_HELP}."
    )


def load_image_folder(root: str | os.PathLike, split: str | None = None, subset: str | None = None) -> Dataset:
    """Images in ``root[/split]/{real,fake}/...`` (any alias pair, nested files allowed).

    `subset` defaults to the folder's name.
    """
    directory = _split_dir(Path(root), split)
    files = _labelled_files(directory)
    if not files:
        raise _no_images_error(directory, "<root>[/<split>]/{real,fake}/*")
    name = subset or Path(root).resolve().name
    ds = _from_files([(path, label, name) for path, label in files])
    check_binary_labels(ds, f"image folder {str(directory)!r}")
    return ds


def _genimage_split_dir(generator_dir: Path, split: str) -> Path | None:
    """`<generator>/<split>`, or `<generator>/<inner>/<split>` as in the official GenImage download."""
    direct = generator_dir / split
    if direct.is_dir():
        return direct
    inner = [p / split for p in sorted(generator_dir.iterdir()) if (p / split).is_dir()]
    return inner[0] if len(inner) == 1 else None


def _select(available: list[str], wanted: list[str] | tuple[str, ...] | None, what: str, root: Path) -> list[str]:
    if wanted is None:
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"{what} {unknown} not found in {str(root)!r}; available: {available}.")
    return list(wanted)


def load_genimage(
    root: str | os.PathLike, split: str = "train", generators: list[str] | tuple[str, ...] | None = None
) -> Dataset:
    """GenImage layout ``<root>/<generator>/{train,val}/{ai,nature}/*``; `subset` = generator folder name.

    The official download's extra level (``<generator>/imagenet_ai_0419_sdv4/train``) is accepted too.
    """
    root = _require_dir(Path(root), "GenImage root")
    split_dirs = {g: _genimage_split_dir(root / g, split) for g in _child_dirs(root)}
    available = sorted(g for g, d in split_dirs.items() if d is not None)
    if not available:
        raise _no_images_error(root, f"<root>/<generator>/{split}/{{ai,nature}}/*")
    files = []
    for generator in _select(available, generators, f"generators with a {split!r} split", root):
        found = _labelled_files(split_dirs[generator])
        if not found:
            raise _no_images_error(split_dirs[generator], f"<generator>/{split}/{{ai,nature}}/*")
        files += [(path, label, generator) for path, label in found]
    ds = _from_files(files)
    check_binary_labels(ds, f"GenImage {str(root)!r} split {split!r}")
    return ds


def load_ufd(
    root: str | os.PathLike, sets: list[str] | tuple[str, ...] | None = None, split: str | None = None
) -> Dataset:
    """CNNSpot / UniversalFakeDetect layout; `subset` = set name.

    Sets may have a class level, ``<root>/<set>/<class>/{0_real,1_fake}/*`` (ProGAN, StyleGAN, ...), or not,
    ``<root>/<set>/{0_real,1_fake}/*`` (DALL-E, Glide, ...). `split` selects ``<root>/<split>`` first.
    """
    directory = _split_dir(Path(root), split)
    found = {s: _labelled_files(directory / s) for s in _child_dirs(directory)}
    available = sorted(s for s, files in found.items() if files)
    if not available:
        raise _no_images_error(directory, "<root>/<set>[/<class>]/{0_real,1_fake}/*")
    files = [(path, label, s) for s in _select(available, sets, "sets", directory) for path, label in found[s]]
    ds = _from_files(files)
    check_binary_labels(ds, f"UFD folder {str(directory)!r}")
    return ds


# --------------------------------------------------------------------------- tables (Hub, parquet, csv)


def _label_converter(feature: Any, column: str, label_map: dict | None) -> tuple[Callable, Callable]:
    """(value -> 0/1 or None, values -> ValueError) for the label column's feature type."""
    names = feature.names if isinstance(feature, ClassLabel) else None
    plain = isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint")) or "string" in feature.dtype)
    if feature is not None and names is None and not plain:
        raise ValueError(
            f"label column {column!r} has type {feature}; expected a ClassLabel, ints 0/1 or strings "
            f"({_ALIAS_HELP}). Pass label_column= naming the column that holds real/fake labels."
        )
    label_map = {k.lower() if isinstance(k, str) else k: v for k, v in (label_map or {}).items()}
    if any(v not in (REAL, FAKE) for v in label_map.values()):
        raise ValueError(f"label_map values must be 0 (real) or 1 (fake), got {label_map}.")

    def key_of(value):
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            value = names[value]
        return value.strip().lower() if isinstance(value, str) else value

    def convert(value):
        key = key_of(value)
        if key in label_map:
            return label_map[key]
        if isinstance(key, str):
            return LABEL_ALIASES.get(key)
        if isinstance(key, int) and not isinstance(key, bool) and key in (REAL, FAKE):
            return key
        return None

    def error(bad_values) -> ValueError:
        shown = sorted({repr(key_of(v)) for v in bad_values})
        return ValueError(
            f"label column {column!r} holds value(s) {', '.join(shown[:10])}"
            f"{' ...' if len(shown) > 10 else ''} that are neither 0/1 nor a known name ({_ALIAS_HELP}). "
            "Pass label_column= naming the column with real/fake labels, or label_map= to map these values, "
            "e.g. label_map={'human': 0, 'generated': 1}."
        )

    return convert, error


def _check_columns(ds: Dataset | IterableDataset, wanted: dict[str, str | None]) -> None:
    if ds.column_names is None:  # a stream with unknown features: rows will tell
        return
    missing = [f"{arg}={col!r}" for arg, col in wanted.items() if col is not None and col not in ds.column_names]
    if missing:
        raise ValueError(
            f"column(s) {', '.join(missing)} not found; the data set has columns {ds.column_names}. "
            "Pass image_column=, label_column= and subset_column= naming the right columns."
        )


def _cast_image(ds, column: str):
    """Undecoded image dicts from an Image feature, file paths or raw bytes."""
    feature = ds.features[column] if ds.features else None
    if feature is None or (isinstance(feature, Image) and not feature.decode):
        return ds
    if not (
        isinstance(feature, Image)
        or (isinstance(feature, Value) and feature.dtype in _IMAGE_VALUE_DTYPES)
        or (isinstance(feature, dict) and set(feature) <= {"bytes", "path"})
    ):
        raise ValueError(
            f"image column {column!r} has type {feature}; expected an Image feature, file paths or image bytes. "
            "Pass image_column= naming the column that holds the images."
        )
    return ds.cast_column(column, Image(decode=False))


def standardize(
    ds: Dataset | IterableDataset,
    image_column: str = "image",
    label_column: str = "label",
    subset_column: str | None = None,
    default_subset: str = "all",
    label_map: dict | None = None,
    base_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Bring any table of images and labels to the standard ``image``/``label``/``subset`` schema.

    Labels map explicitly: ClassLabel names and strings through the aliases (or `label_map`), ints must be
    0/1; any other value raises ValueError naming it. Relative image paths resolve against `base_dir` (the
    folder of a csv/jsonl file). Other columns are dropped. A `Dataset` is checked for both classes at once;
    an `IterableDataset` is mapped lazily and raises on the first unknown label it meets.
    """
    _check_columns(ds, {"image_column": image_column, "label_column": label_column, "subset_column": subset_column})
    features = ds.features
    convert, error = _label_converter(features[label_column] if features else None, label_column, label_map)
    subset_feature = features[subset_column] if features and subset_column else None

    def subset_of(value) -> str:
        return subset_feature.int2str(value) if isinstance(subset_feature, ClassLabel) else str(value)

    image_feature = features[image_column] if features else None
    if base_dir is not None and isinstance(image_feature, Value) and "string" in image_feature.dtype:
        ds = ds.map(lambda path: {image_column: os.path.join(base_dir, path)}, input_columns=image_column)

    if isinstance(ds, IterableDataset):
        ds = _cast_image(ds, image_column)

        def standard_row(row):
            label = convert(row[label_column])
            if label is None:
                raise error([row[label_column]])
            subset = subset_of(row[subset_column]) if subset_column else default_subset
            return {"image": row[image_column], "label": label, "subset": subset}

        return ds.map(standard_row, remove_columns=ds.column_names, features=FEATURES)

    raw_labels = list(ds[label_column])
    table = {value: convert(value) for value in set(raw_labels)}
    bad = [value for value, label in table.items() if label is None]
    if bad:
        raise error(bad)
    subsets = [subset_of(v) for v in ds[subset_column]] if subset_column else [default_subset] * len(ds)
    images = _cast_image(ds.select_columns([image_column]), image_column)
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    out = images.add_column("label", [table[v] for v in raw_labels], feature=FEATURES["label"])
    out = out.add_column("subset", subsets, feature=FEATURES["subset"])
    check_binary_labels(out)
    return out


def load_hub(
    dataset_id: str,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    subset_column: str | None = None,
    streaming: bool = False,
    label_map: dict | None = None,
    **load_kwargs,
) -> Dataset | IterableDataset:
    """A Hub data set (or any `load_dataset` path, e.g. ``"parquet"`` with ``data_files=``) in the standard
    schema; `streaming=True` gives an `IterableDataset` (use ``.map``, it has no ``with_transform``)."""
    ds = load_dataset(dataset_id, split=split, streaming=streaming, **load_kwargs)
    return standardize(ds, image_column, label_column, subset_column, label_map=label_map)


def load_data(
    source: str | os.PathLike,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    subset_column: str | None = None,
    streaming: bool = False,
    **kwargs,
) -> Dataset | IterableDataset:
    """One entry point for every source the training script accepts; the one place that tells them apart.

    - ``genimage:<root>`` -> `load_genimage` (GenImage names its test split ``val``);
    - ``ufd:<root>`` -> `load_ufd`, using ``<root>/<split>`` when that folder exists;
    - an existing folder -> `load_image_folder`, likewise using ``<root>/<split>`` when it exists;
    - a local ``.parquet``/``.csv``/``.jsonl`` file -> its rows (the whole file, whatever `split`); relative
      image paths resolve against the file's folder and `subset` defaults to the file name;
    - anything else -> a Hub id for `load_hub` (the only source that streams).
    The column names apply to tables (files, Hub); folders have fixed layouts. Extra keyword arguments go to
    the chosen loader.
    """
    source = os.path.expanduser(str(source))
    scheme, _, rest = source.partition(":")
    if scheme == "genimage" and rest:
        return load_genimage(rest, split=split, **kwargs)
    if scheme == "ufd" and rest:
        return load_ufd(rest, split=split if (Path(rest) / split).is_dir() else None, **kwargs)
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, split=split if (path / split).is_dir() else None, **kwargs)
    columns = {"image_column": image_column, "label_column": label_column, "subset_column": subset_column}
    builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
    if builder and path.is_file():
        ds = load_dataset(builder, data_files=str(path), split="train")
        kwargs.setdefault("default_subset", path.stem)
        return standardize(ds, base_dir=str(path.resolve().parent), **columns, **kwargs)
    if builder or source.startswith((".", "/")):
        raise ValueError(
            f"{source!r} does not exist; expected a folder, a {'/'.join(LOCAL_FILE_BUILDERS)} file "
            "or a Hub data set id."
        )
    return load_hub(source, split=split, streaming=streaming, **columns, **kwargs)
