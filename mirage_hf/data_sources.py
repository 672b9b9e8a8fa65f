"""The data a run trains or evaluates on: a `--dataset` value resolved to a source `load_data` reads ("synthetic" is
generated once into the run's folder) and one split of it loaded, filtered and checked."""

import json
from pathlib import Path

from datasets import IterableDataset

from .data import check_binary_labels, load_data
from .demo.synthetic import make_synthetic_genimage
from .train_config import EvaluationOptions

SYNTHETIC_DIR = "synthetic-data"  # in a run's output folder
SYNTHETIC_STAMP = "options.json"  # the generator options a synthetic-data folder was made with


def stamped_options(root: Path) -> dict | None:
    """The generator options the synthetic-data folder `root` was made with; None when it has no stamp."""
    stamp = root / SYNTHETIC_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def made_with(root: Path, options: dict) -> bool:
    """Whether `root` holds a generated data set made with `options`."""
    return stamped_options(root) == options


def synthetic_data_options(cfg: EvaluationOptions) -> dict:
    """What the "synthetic" data is generated with (`make_synthetic_genimage`); eval_results.json records it, so
    that `mirage-adapt` can regenerate the evaluation data."""
    return {"seed": cfg.seed, **cfg.synthetic}


def resolve_dataset(cfg: EvaluationOptions, source: str, trained_model: str | None = None) -> str:
    """ "synthetic" becomes a generated GenImage-layout folder (made once, deterministic for the options). Given the
    `trained_model` folder under evaluation, the folder of the run that trained it is used when it was made with
    the same options."""
    if source != "synthetic":
        return source
    options = synthetic_data_options(cfg)
    trained_with = Path(trained_model or "").parent / SYNTHETIC_DIR
    if trained_model and made_with(trained_with, options):
        return f"genimage:{trained_with}"
    root = Path(cfg.output_dir) / SYNTHETIC_DIR
    if not made_with(root, options):
        make_synthetic_genimage(root, **options)
        (root / SYNTHETIC_STAMP).write_text(json.dumps(options))
    return f"genimage:{root}"


def load_split(cfg: EvaluationOptions, source: str, split: str, subsets, max_samples):
    """One split in the standard image/label/subset schema, filtered and checked before any long work."""
    ds = load_data(
        source, split=split, image_column=cfg.image_column, label_column=cfg.label_column,
        subset_column=cfg.subset_column, streaming=cfg.streaming,
    )  # fmt: skip
    if subsets:
        wanted = set(subsets)
        ds = ds.filter(lambda subset: subset in wanted, input_columns="subset")
    if max_samples:
        ds = (
            ds.take(max_samples)
            if isinstance(ds, IterableDataset)
            else ds.shuffle(seed=cfg.seed).select(range(min(max_samples, len(ds))))
        )
    check_binary_labels(ds, f"{source} [{split}{', ' + ', '.join(subsets) if subsets else ''}]")
    return ds
