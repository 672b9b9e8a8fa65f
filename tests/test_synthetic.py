"""The offline demo data: deterministic, in the GenImage layout, and learnable from its artefacts."""

from pathlib import Path

import numpy as np
import pytest

from mirage_hf.data import FEATURES, class_counts, load_genimage, subset_names
from mirage_hf.demo.synthetic import GENERATORS, make_synthetic_genimage, synthetic_dataset
from mirage_hf.transforms import open_image


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_make_synthetic_genimage_is_deterministic(tmp_path):
    kwargs = {"generators": ("upsampler", "banding"), "n_train_per_class": 3, "n_val_per_class": 2, "image_size": 32}
    first = file_bytes(make_synthetic_genimage(tmp_path / "a", seed=7, **kwargs))
    assert first == file_bytes(make_synthetic_genimage(tmp_path / "b", seed=7, **kwargs))
    other = file_bytes(make_synthetic_genimage(tmp_path / "c", seed=8, **kwargs))
    assert first.keys() == other.keys() and all(first[k] != other[k] for k in first)
    images = [np.asarray(open_image(b)) for b in first.values()]
    assert len({img.tobytes() for img in images}) == len(images)  # every image differs


def test_layout_and_labels_through_load_genimage(tmp_path):
    root = make_synthetic_genimage(tmp_path, n_train_per_class=4, n_val_per_class=2, image_size=32)
    assert sorted(p.name for p in root.iterdir()) == sorted(GENERATORS)
    assert {p.name for p in (root / "gridder" / "val").iterdir()} == {"ai", "nature"}
    train, val = load_genimage(root, "train"), load_genimage(root, "val")
    n = len(GENERATORS)
    assert class_counts(train) == {"real": 4 * n, "fake": 4 * n} and class_counts(val) == {"real": 2 * n, "fake": 2 * n}
    assert subset_names(val) == sorted(GENERATORS)
    for row in train:
        path = Path(row["image"]["path"])
        assert row["label"] == (1 if path.parent.name == "ai" else 0)
        assert row["subset"] == path.parts[-4]
        assert open_image(row["image"]).size == (32, 32)
    # a rerun with fewer images leaves no stale files behind
    make_synthetic_genimage(tmp_path, n_train_per_class=1, n_val_per_class=1, image_size=32)
    assert class_counts(load_genimage(tmp_path, "train")) == {"real": n, "fake": n}


def test_synthetic_dataset_schema_and_balance():
    ds = synthetic_dataset(n=7, image_size=32, seed=0, generator="diffusion")
    assert ds.features == FEATURES and len(ds) == 7
    assert list(ds["label"]) == [0, 1, 0, 1, 0, 1, 0]
    assert set(ds["subset"]) == {"diffusion"}
    assert all(open_image(row["image"]).size == (32, 32) for row in ds)
    with pytest.raises(ValueError, match="unknown synthetic generator"):
        synthetic_dataset(generator="dalle")
    with pytest.raises(ValueError, match="multiple of 16"):
        synthetic_dataset(image_size=30)


# --------------------------------------------------------------------------- learnability


def grey_stack(ds) -> np.ndarray:
    return np.stack([np.asarray(open_image(row["image"]), dtype=np.float64).mean(axis=2) for row in ds])


def blockiness(g):  # 2x pixel repetition: differences inside 2-pixel blocks vanish
    d = np.abs(np.diff(g, axis=2))
    return d[:, :, 1::2].mean(axis=(1, 2)) / (d[:, :, 0::2].mean(axis=(1, 2)) + 1e-6)


def laplacian_energy(g):  # over-smoothing (or interpolating) removes fine detail
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def seam_contrast(g):  # brighter columns on the edges of 8-pixel tiles
    profile = g.mean(axis=1)
    seams = np.isin(np.arange(g.shape[2]) % 8, (0, 7))
    return profile[:, seams].mean(axis=1) - profile[:, ~seams].mean(axis=1)


def flatness(g):  # posterisation leaves runs of identical pixels
    return (np.diff(g, axis=2) == 0).mean(axis=(1, 2))


STATISTICS = {
    "upsampler": blockiness, "resampler": laplacian_energy, "diffusion": laplacian_energy, "gridder": seam_contrast,
    "banding": flatness,
}  # fmt: skip


def fit_threshold(x, y):
    """Best (threshold, direction) on training data: a one-feature classifier."""
    return max((np.mean((d * (x - t) > 0) == y), t, d) for t in np.unique(x) for d in (1, -1))[1:]


def accuracy(x, y, threshold, direction) -> float:
    return float(np.mean((direction * (x - threshold) > 0) == y))


@pytest.fixture(scope="module")
def splits():
    """Per generator: (train, held-out) as (grey images, labels), from different seeds."""
    out = {}
    for generator in GENERATORS:
        train, test = (synthetic_dataset(n=60, image_size=32, seed=s, generator=generator) for s in (0, 1))
        out[generator] = [(grey_stack(ds), np.array(ds["label"])) for ds in (train, test)]
    return out


@pytest.mark.parametrize("generator", GENERATORS)
def test_each_generator_is_separable_by_a_simple_statistic(splits, generator):
    statistic = STATISTICS[generator]
    (train_x, train_y), (test_x, test_y) = splits[generator]
    rule = fit_threshold(statistic(train_x), train_y)
    assert accuracy(statistic(test_x), test_y, *rule) >= 0.9


def test_generators_leave_different_traces(splits):
    """The upsampler's rule does not catch the gridder's fakes: transfer across generators is not free."""
    (train_x, train_y), _ = splits["upsampler"]
    rule = fit_threshold(blockiness(train_x), train_y)
    test_x, test_y = splits["gridder"][1]
    assert accuracy(blockiness(test_x), test_y, *rule) < 0.7
