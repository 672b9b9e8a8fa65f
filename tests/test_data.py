"""Loaders: explicit real=0 / fake=1 labels for every layout, and early, helpful errors."""

import io
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value
from PIL import Image as PILImage

from mirage_hf import data
from mirage_hf.data import (
    FEATURES,
    check_binary_labels,
    class_counts,
    load_data,
    load_genimage,
    load_hub,
    load_image_folder,
    load_ufd,
    standardize,
    subset_names,
)


def write_png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)
    return path


def png_bytes(value: int = 128) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def labels_by_name(ds) -> dict[str, int]:
    return {Path(row["image"]["path"]).name: row["label"] for row in ds}


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize(
    "real_name, fake_name",
    [("real", "fake"), ("nature", "ai"), ("0_real", "1_fake"), ("Real", "FAKE")],
)
def test_image_folder_aliases_map_real_0_fake_1(tmp_path, real_name, fake_name):
    # ("real", "fake") and ("nature", "ai") sort fake first: imagefolder would give fake = 0.
    root = tmp_path / "my_set"
    write_png(root / real_name / "r1.png")
    write_png(root / real_name / "deeper" / "nested" / "r2.png")
    write_png(root / fake_name / "f1.png")
    ds = load_image_folder(root)
    assert ds.features == FEATURES
    assert labels_by_name(ds) == {"r1.png": 0, "r2.png": 0, "f1.png": 1}
    assert subset_names(ds) == ["my_set"]
    assert ds[0]["image"]["bytes"] is None and Path(ds[0]["image"]["path"]).is_absolute()


def test_image_folder_keeps_undecodable_files_and_skips_non_images(tmp_path):
    write_png(tmp_path / "real" / "ok.png")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "corrupt.jpg").write_bytes(b"not a jpeg")  # decoding (and skipping) is the collator's job
    (tmp_path / "fake" / "notes.txt").write_text("ignored")
    (tmp_path / "fake" / ".hidden.png").write_bytes(b"")
    write_png(tmp_path / "README" / "x.png")  # not a class folder
    assert labels_by_name(load_image_folder(tmp_path)) == {"ok.png": 0, "corrupt.jpg": 1}


def test_training_folders_and_mirage_detect_take_the_same_files(tmp_path):
    from mirage_hf.cli import find_images

    for name in ("real/a.png", "real/b.webp", "fake/c.JPG", "fake/d.tiff"):
        write_png(tmp_path / name)  # the extension, not the content, decides what a scan takes
    for name in ("fake/clip.mpg", "fake/layers.psd", "fake/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(labels_by_name(load_image_folder(tmp_path))) == ["a.png", "b.webp", "c.JPG", "d.tiff"]
    assert sorted(Path(p).name for p in find_images([str(tmp_path)])) == ["a.png", "b.webp", "c.JPG", "d.tiff"]


def test_image_folder_split_subfolder(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / split / "0_real" / f"{split}_r.png")
        write_png(tmp_path / split / "1_fake" / f"{split}_f.png")
    assert labels_by_name(load_image_folder(tmp_path, split="train")) == {"train_r.png": 0, "train_f.png": 1}
    with pytest.raises(ValueError, match=r"split folders \['test', 'train'\].*split="):
        load_image_folder(tmp_path)  # would silently mix train and test
    with pytest.raises(ValueError, match="split 'val' not found"):
        load_image_folder(tmp_path, split="val")


def test_image_folder_missing_class_raises_with_fix(tmp_path):
    write_png(tmp_path / "real" / "a.png")
    with pytest.raises(ValueError, match="no fake images.*counts.*'real': 1") as err:
        load_image_folder(tmp_path)
    assert "ai" in str(err.value)  # says which folder names would count as fake


def test_empty_or_unlabelled_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no labelled images"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "cats" / "a.png")
    write_png(tmp_path / "dogs" / "b.png")
    with pytest.raises(ValueError, match=r"sub-folders: \['cats', 'dogs'\].*real/nature/0_real"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "missing")


# --------------------------------------------------------------------------- GenImage and UFD


def make_genimage(root: Path) -> Path:
    for generator in ("sdv4", "midjourney"):
        for split in ("train", "val"):
            write_png(root / generator / split / "ai" / f"{generator}_{split}_ai.png")
            write_png(root / generator / split / "nature" / f"{generator}_{split}_nature.png")
    # the official download nests one more level: <generator>/imagenet_ai_0508_adm/<split>/...
    write_png(root / "adm" / "imagenet_ai_0508_adm" / "val" / "ai" / "adm_val_ai.png")
    write_png(root / "adm" / "imagenet_ai_0508_adm" / "val" / "nature" / "adm_val_nature.png")
    return root


def test_genimage_labels_subsets_and_filter(tmp_path):
    root = make_genimage(tmp_path)
    train = load_genimage(root, split="train")
    assert subset_names(train) == ["midjourney", "sdv4"]
    assert all(row["label"] == (1 if "_ai" in row["image"]["path"] else 0) for row in train)
    assert all(row["subset"] in Path(row["image"]["path"]).name for row in train)
    val = load_genimage(root, split="val")
    assert subset_names(val) == ["adm", "midjourney", "sdv4"]
    assert class_counts(val) == {"real": 3, "fake": 3}
    only = load_genimage(root, split="val", generators=["adm"])
    assert labels_by_name(only) == {"adm_val_ai.png": 1, "adm_val_nature.png": 0}
    with pytest.raises(ValueError, match=r"\['dalle'\] not found.*available: \['adm', 'midjourney', 'sdv4'\]"):
        load_genimage(root, split="val", generators=["dalle"])
    with pytest.raises(ValueError, match="no labelled images"):
        load_genimage(root, split="test")


def test_ufd_with_and_without_class_level(tmp_path):
    for cls in ("car", "cat"):
        write_png(tmp_path / "progan" / cls / "0_real" / f"progan_{cls}_r.png")
        write_png(tmp_path / "progan" / cls / "1_fake" / f"progan_{cls}_f.png")
    write_png(tmp_path / "dalle" / "0_real" / "dalle_r.png")
    write_png(tmp_path / "dalle" / "1_fake" / "dalle_f.png")
    ds = load_ufd(tmp_path)
    assert subset_names(ds) == ["dalle", "progan"]
    assert labels_by_name(ds) == {
        "progan_car_r.png": 0,
        "progan_car_f.png": 1,
        "progan_cat_r.png": 0,
        "progan_cat_f.png": 1,
        "dalle_r.png": 0,
        "dalle_f.png": 1,
    }
    assert all(row["subset"] in Path(row["image"]["path"]).name for row in ds)
    assert subset_names(load_ufd(tmp_path, sets=["dalle"])) == ["dalle"]


def test_ufd_set_missing_a_class_warns_and_all_fake_raises(tmp_path):
    write_png(tmp_path / "a" / "0_real" / "r.png")
    write_png(tmp_path / "a" / "1_fake" / "f.png")
    write_png(tmp_path / "b" / "1_fake" / "f.png")
    with pytest.warns(UserWarning, match=r"\['b'\] hold only one class"):
        load_ufd(tmp_path)
    with pytest.raises(ValueError, match="no real images"):
        load_ufd(tmp_path, sets=["b"])


# --------------------------------------------------------------------------- tables: load_hub / standardize


def write_parquet(path: Path, labels, label_feature=None, **extra_columns) -> Path:
    columns = {"img": [{"bytes": png_bytes(i), "path": None} for i in range(len(labels))], "y": labels}
    columns.update(extra_columns)
    features = None
    if label_feature is not None:
        features = Features({"img": Image(), "y": label_feature, **{k: Value("string") for k in extra_columns}})
    Dataset.from_dict(columns, features=features).to_parquet(path)
    return path


def load_parquet(path, **options):
    """`load_hub` on a local parquet file written by `write_parquet` (images in "img", labels in "y")."""
    options = {"image_column": "img", "label_column": "y", **options}
    return load_hub("parquet", data_files=str(path), cache_dir=str(path.parent / "cache"), **options)


@pytest.mark.parametrize(
    "labels, feature, expected",
    [
        (["nature", "AI", "real", "fake", "0_real", "1_fake"], None, [0, 1, 0, 1, 0, 1]),
        ([0, 1, 1, 0], None, [0, 1, 1, 0]),
        ([0, 1, 1, 0], ClassLabel(names=["fake", "real"]), [1, 0, 0, 1]),  # imagefolder's sorted order
        ([1, 0], ClassLabel(names=["ai", "nature"]), [0, 1]),
    ],
)
def test_load_hub_local_parquet_maps_labels(tmp_path, labels, feature, expected):
    subsets = [f"g{i // 2}" for i in range(len(labels))]
    path = write_parquet(tmp_path / "d.parquet", labels, feature, gen=subsets)
    ds = load_parquet(path, subset_column="gen")
    assert ds.features == FEATURES
    assert list(ds["label"]) == expected
    assert list(ds["subset"]) == subsets
    assert ds[0]["image"]["bytes"] == png_bytes(0)


def test_load_hub_streaming_maps_lazily_and_raises_on_unknown(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ["ai", "nature", "ai"])
    ds = load_parquet(path, streaming=True)
    assert isinstance(ds, IterableDataset)
    rows = list(ds)
    assert [r["label"] for r in rows] == [1, 0, 1] and {r["subset"] for r in rows} == {"all"}
    assert rows[0]["image"]["bytes"] == png_bytes(0)
    check_binary_labels(ds)  # streams are not counted: no error, no full read
    bad = load_parquet(write_parquet(tmp_path / "bad.parquet", ["ai", "cat"]), streaming=True)
    with pytest.raises(ValueError, match="'cat'"):
        list(bad)


@pytest.mark.parametrize(
    "labels, match",
    [
        (["ai", "cat", "human"], r"label column 'y' holds value\(s\) 'cat', 'human'.*label_column="),
        ([0, 1, 2], r"value\(s\) 2 .*label_map="),
        ([0.0, 1.0], r"label column 'y' has type Value\('float64'\).*label_column="),
    ],
)
def test_unknown_label_values_raise_helpful_error(tmp_path, labels, match):
    path = write_parquet(tmp_path / "d.parquet", labels)
    with pytest.raises(ValueError, match=match):
        load_parquet(path)


def test_label_map_fixes_unknown_values_and_missing_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ["human", "generated", "Human"])
    ds = load_parquet(path, label_map={"human": 0, "generated": 1})
    assert list(ds["label"]) == [0, 1, 0]
    with pytest.raises(ValueError, match=r"label_column='label' not found.*\['img', 'y'\]"):
        load_parquet(path, label_column="label")


def test_table_with_one_class_raises(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ["ai", "ai"])
    with pytest.raises(ValueError, match="no real images"):
        load_parquet(path)


def test_standardize_in_memory_decoded_images():
    ds = Dataset.from_dict(
        {"picture": [PILImage.new("RGB", (3, 3))] * 2, "kind": ["fake", "real"], "other": [1, 2]},
        features=Features({"picture": Image(), "kind": Value("string"), "other": Value("int64")}),
    )
    out = standardize(ds, image_column="picture", label_column="kind", default_subset="mine")
    assert out.column_names == ["image", "label", "subset"]
    assert list(out["label"]) == [1, 0] and list(out["subset"]) == ["mine", "mine"]
    assert isinstance(out[0]["image"]["bytes"], bytes)  # undecoded


# --------------------------------------------------------------------------- load_data dispatch


def test_load_data_dispatches_every_local_source(tmp_path):
    genimage = make_genimage(tmp_path / "genimage")
    assert subset_names(load_data(f"genimage:{genimage}", split="val")) == ["adm", "midjourney", "sdv4"]

    ufd = tmp_path / "cnnspot"
    for split in ("train", "test"):
        write_png(ufd / split / "progan" / "car" / "0_real" / "r.png")
        write_png(ufd / split / "progan" / "car" / "1_fake" / "f.png")
    assert class_counts(load_data(f"ufd:{ufd}", split="test")) == {"real": 1, "fake": 1}
    assert subset_names(load_data(f"ufd:{ufd / 'test'}", split="train")) == ["progan"]  # no train/ inside

    folder = tmp_path / "folder"
    write_png(folder / "nature" / "n.png")
    write_png(folder / "ai" / "a.png")
    assert labels_by_name(load_data(str(folder), split="train")) == {"n.png": 0, "a.png": 1}
    # train.py passes its table options for every source; folders have a fixed layout and ignore them
    assert len(load_data(str(folder), image_column="img", label_column="y", streaming=True)) == 2

    parquet = write_parquet(tmp_path / "table.parquet", ["nature", "ai"])
    ds = load_data(str(parquet), image_column="img", label_column="y")
    assert list(ds["label"]) == [0, 1] and subset_names(ds) == ["table"]


def test_load_data_csv_resolves_relative_paths(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "b.png")
    (tmp_path / "list.csv").write_text("file,kind\nimgs/a.png,0_real\nimgs/b.png,1_fake\n")
    ds = load_data(str(tmp_path / "list.csv"), image_column="file", label_column="kind")
    assert [Path(row["image"]["path"]) for row in ds] == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert list(ds["label"]) == [0, 1]


def test_load_data_hub_id_and_missing_local_path(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, split, streaming, **kwargs):
        calls.append((path, split, streaming))
        return Dataset.from_dict({"image": [{"bytes": png_bytes(), "path": None}] * 2, "label": [0, 1]})

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    assert class_counts(load_data("org/detector-data", split="test")) == {"real": 1, "fake": 1}
    assert calls == [("org/detector-data", "test", False)]
    load_data("org/detector-data", streaming=True)
    assert calls.pop() == ("org/detector-data", "train", True)
    with pytest.raises(ValueError, match="does not exist"):
        load_data(str(tmp_path / "missing.parquet"))
    assert len(calls) == 1  # a missing local file is not sent to the Hub
