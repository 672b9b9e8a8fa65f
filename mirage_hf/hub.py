"""Publish a trained detector: stage a model repo (weights, remote code, model card) and a Gradio Space, then
upload both.

Staging and uploading are separate so that what would be pushed can be inspected (`--dry_run`) and tested
without a network. The card's `model-index` carries the numbers from the folder's `eval_results.json`, and its
licence follows the training data: GenImage is CC BY-NC-SA 4.0, so weights trained on it are non-commercial.
The token is never taken on the command line, printed or written: `HfApi` reads `HF_TOKEN` or the login cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, SpaceCard
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from . import __version__
from .adapter_config import MiraGeAdapterConfig
from .adapter_files import ADAPT_RESULTS_NAME, ADAPTER_WEIGHTS_NAME, is_detector_adapter
from .configuration_mirage import MiraGeConfig
from .inference import DEFAULT_UNSURE_MARGIN
from .metrics import format_before_after, format_comparison_table, format_table
from .model_folder import BACKEND_EVAL_RESULTS_FILE, EVAL_RESULTS_FILE
from .onnx_runtime import INFO_FILE, ONNX_DIR, ONNX_FILES
from .transforms import preprocessing_mismatch

PACKAGE = files("mirage_hf")
SPACE_TEMPLATE = files("mirage_hf.space")  # space/ (package data): the Space's app, requirements, card and examples
SPACE_FILES = ("app.py", "requirements.txt", "examples")
NOT_IN_SPACE_COPY = ("__pycache__", "*.pyc", "space", "configs")  # the Space's own copy of mirage_hf needs neither
MODEL_FILES = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "*.py",
    EVAL_RESULTS_FILE,
)
REQUIRED_MODEL_FILES = ("config.json", "preprocessor_config.json", "configuration_mirage.py", "modeling_mirage.py")
CARD_METRICS = {
    "accuracy": "Accuracy",
    "average_precision": "Average precision (fake = positive)",
    "roc_auc": "ROC AUC",
    "tpr_at_5_fpr": "TPR at 5% FPR",
}
CARD_DECIMALS = 4  # metric values in the card's model-index (0.8600000000000001 reads as 0.86)
NON_COMMERCIAL_DATA = {"genimage": "GenImage"}  # data set keyword -> name; their licence is CC BY-NC-SA 4.0
TAGS = ["mirage", "ai-generated-image-detection", "deepfake-detection", "clip", "prompt-learning", "mirage-hf"]


def _is_repo_id(name: str | None) -> bool:
    """An `owner/name` id by the Hub's own rules (`validate_repo_id`)."""
    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_hub_id(name: str | None) -> bool:
    """A Hub repo id rather than a local path (the card must not point at, or leak, a local folder)."""
    return _is_repo_id(name) and not Path(name).exists()


def _repo_id(text: str) -> str:
    if not _is_repo_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id of the form owner/name")
    return text


def _non_commercial_source(eval_dataset: str) -> str | None:
    return next((name for key, name in NON_COMMERCIAL_DATA.items() if key in eval_dataset.lower()), None)


def choose_license(eval_dataset: str, license: str | None) -> str:
    """The weights' licence: CC BY-NC-SA 4.0 by default for GenImage-trained weights (and nothing that drops the
    non-commercial term); otherwise it must be given, because it follows data this code cannot see."""
    source = _non_commercial_source(eval_dataset)
    if source is None:
        if not license:
            raise ValueError(
                f"pass a licence (--license): the weights' licence follows their training data ({eval_dataset!r})"
            )
        return license
    if license is None:
        return "cc-by-nc-sa-4.0"
    if "nc" not in license.lower().split("-"):
        raise ValueError(f"{source} is CC BY-NC-SA 4.0: weights trained on it cannot be licensed {license!r}")
    return license


def _dataset_label(eval_dataset: str) -> str:
    """A public name for the data: the GenImage / UFD protocols by name, Hub ids and "synthetic" as they are,
    local paths by their last component only."""
    kind, _, root = eval_dataset.partition(":")
    if root and kind in ("genimage", "ufd"):
        return {"genimage": "GenImage", "ufd": "UniversalFakeDetect"}[kind]
    return eval_dataset if eval_dataset == "synthetic" or _is_hub_id(eval_dataset) else Path(eval_dataset).name


def _eval_results(results: dict) -> list[EvalResult]:
    """One EvalResult per subset (generators, then mean and all) and metric of the clean condition. The subset is
    also the dataset config: the Hub groups results by (task, type, config, split) and would merge subsets."""
    dataset_type = _dataset_label(results["eval_dataset"])
    return [
        EvalResult(
            task_type="image-classification",
            task_name="AI-generated image detection",
            dataset_type=dataset_type,
            dataset_name=subset,
            dataset_config=subset,
            dataset_split=results.get("eval_split"),
            metric_type=metric,
            metric_name=label,
            metric_value=round(metrics[metric], CARD_DECIMALS),
        )
        for subset, metrics in results["clean"].items()
        for metric, label in CARD_METRICS.items()
        if metrics.get(metric) is not None
    ]


def _usage_section(repo_id: str) -> str:
    return f"""## How to use

```python
from transformers import pipeline

detector = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
detector("photo.jpg")  # [{{'label': 'fake', 'score': ...}}, {{'label': 'real', 'score': ...}}]
```

`trust_remote_code=True` is needed because MiraGe is not a transformers architecture: this repo ships its model
code (`configuration_mirage.py`, `modeling_mirage.py`), and the flag lets transformers run it. Read those files
before trusting them. With the `mirage-hf` package installed, `import mirage_hf` registers the classes with
transformers and the flag is not needed:

```python
import mirage_hf  # registers MiraGe with the Auto classes
from transformers import pipeline

detector = pipeline("image-classification", model="{repo_id}")
# or verdicts with an "unsure" band around the calibrated threshold:
from mirage_hf.inference import Detector

Detector.from_pretrained("{repo_id}", unsure_margin={DEFAULT_UNSURE_MARGIN})(images)  # [Verdict(label, p_fake), ...]
```
"""


ONNX_SNIPPET = """```python
# pip install onnxruntime huggingface_hub pillow numpy   (no torch, no transformers, no mirage-hf)
import json

import numpy as np
import onnxruntime as ort
from huggingface_hub import snapshot_download
from PIL import Image

folder = snapshot_download("{repo_id}", allow_patterns=["*.json", "onnx/{file}"])
processor = json.load(open(f"{{folder}}/preprocessor_config.json"))


def preprocess(image):
    \"\"\"What the saved image processor does (preprocessor_config.json; transformers' PIL backend): the short side
    resized (bicubic) if do_resize, the centre crop (zero padding where the image is smaller), rescale, normalise.\"\"\"
    image = image.convert("RGB")
    if processor["do_resize"]:
        side, (w, h) = processor["size"]["shortest_edge"], image.size
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    (h, w), crop_h, crop_w = pixels.shape[:2], processor["crop_size"]["height"], processor["crop_size"]["width"]
    canvas = np.zeros((max(h, crop_h), max(w, crop_w), 3), dtype=np.float32)
    top, left = (canvas.shape[0] - h + 1) // 2, (canvas.shape[1] - w + 1) // 2
    canvas[top : top + h, left : left + w] = pixels
    top, left = (canvas.shape[0] - crop_h) // 2, (canvas.shape[1] - crop_w) // 2
    pixels = canvas[top : top + crop_h, left : left + crop_w]
    pixels = (pixels * processor["rescale_factor"] - processor["image_mean"]) / processor["image_std"]
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


session = ort.InferenceSession(f"{{folder}}/onnx/{file}", providers=["CPUExecutionProvider"])
p_fake = float(session.run(["p_fake"], {{"pixel_values": preprocess(Image.open("photo.jpg"))}})[0][0])
print("fake" if p_fake >= 0.5 else "real", round(p_fake, 4))  # the threshold is folded into p_fake
```"""


def _onnx_section(model_dir: Path, repo_id: str, results: dict | None) -> str:
    """How to run the exported graphs with ONNX Runtime alone, and what int8 costs in accuracy, where measured."""
    onnx_dir = model_dir / ONNX_DIR
    if not (onnx_dir / INFO_FILE).is_file():
        return ""
    info = json.loads((onnx_dir / INFO_FILE).read_text())
    quantized = "onnx-int8" in info["files"]
    file = ONNX_FILES["onnx-int8" if quantized else "onnx"]
    text = f"""## ONNX Runtime (CPU deployment)

`onnx/model.onnx` (fp32){" and `onnx/model_quantized.onnx` (int8 weights, dynamic quantization)" if quantized else ""}
hold the eval path with the text anchors, temperature and threshold folded in (opset {info["opset"]}, exported
with mirage-hf {info["versions"]["mirage_hf"]}, torch {info["versions"]["torch"]}; details in
`onnx/{INFO_FILE}`). Input `pixel_values` (batch, 3, S, S); outputs `logits` (the calibrated logits, as the
PyTorch model's), `logit_diff` and `p_fake`. With `mirage-hf` installed:
`mirage-detect photos/ --model {repo_id} --backend {"onnx-int8" if quantized else "onnx"}`. Without it:

{ONNX_SNIPPET.format(repo_id=repo_id, file=file)}
"""
    cost_path = onnx_dir / BACKEND_EVAL_RESULTS_FILE.format(backend="onnx-int8")
    if not quantized:
        return text
    if results is None or not cost_path.is_file():
        return text + (
            "\nThe accuracy cost of the int8 graph has not been measured for this model "
            "(`python train.py --eval_only --model DIR --backend onnx-int8 --dataset ...` measures it).\n"
        )
    int8 = json.loads(cost_path.read_text())
    if (int8["eval_dataset"], int8.get("eval_split")) != (results["eval_dataset"], results.get("eval_split")):
        return text + (
            f"\nThe int8 graph was evaluated on `{_dataset_label(int8['eval_dataset'])}`, not on the data above, so "
            f"no accuracy cost is stated (its mean accuracy there: {100 * int8['clean']['mean']['accuracy']:.1f}%).\n"
        )
    rows = [
        f"| {subset} | {100 * metrics['accuracy']:.1f} | {100 * int8['clean'][subset]['accuracy']:.1f} | "
        f"{100 * (int8['clean'][subset]['accuracy'] - metrics['accuracy']):+.1f} |"
        for subset, metrics in results["clean"].items()
        if subset in int8["clean"]
    ]
    return (
        text
        + f"""
Accuracy cost of int8 on the evaluation data above (`train.py --eval_only --backend onnx-int8`), in percent:

| subset | PyTorch fp32 | ONNX Runtime int8 | difference |
|---|---|---|---|
{chr(10).join(rows)}
"""
    )


def _calibration_section(config: dict, results: dict | None) -> str:
    calibration = (results or {}).get("calibration")
    if calibration is None:
        how = "How they were chosen is not recorded with this model."
    else:
        how = (
            f"They were chosen on {calibration['n_real']} real and {calibration['n_fake']} fake held-out training "
            f"images, never trained on and never from the test split. Rule: {calibration['rule']}."
        )
        how += "".join(f"\n\n> {note}" for note in calibration.get("warnings", []))
    return f"""## Decision threshold and calibration

Temperature T = {config["calibration_temperature"]:.4g}, decision threshold t = {config["decision_threshold"]:.4g} on
sigmoid((logit_fake - logit_real) / T). {how}

Both are folded into the output logits, so every surface (the pipeline's `fake` score, the model output's
`p_fake`, `mirage-detect`, the Space, ONNX) reports one score, p(fake) = sigmoid((logit_fake - logit_real) / T -
logit(t)), and calls an image fake when it reaches 0.5; the model output also carries the raw `logit_diff`.
"""


def _evaluation_section(results: dict | None) -> str:
    if results is None:
        return "## Evaluation\n\nNo evaluation results were shipped with this model.\n"
    title = f"threshold {results['threshold']:.3f}, temperature {results['temperature']:.3f}"
    text = f"""## Evaluation

Data: `{_dataset_label(results["eval_dataset"])}`, split `{results.get("eval_split")}`, preprocessing \
`{results.get("preprocess")}`, {results.get("bad_images", 0)} unreadable images skipped. Metrics in percent, fake
is the positive class; `mean` averages the generators, `all` pools their images. AP, AUC and TPR@5% rank images by
the uncalibrated logit difference, so the temperature does not change them; accuracies and ECE use the calibrated
p(fake) at the threshold.

```
{format_table(results["clean"], title=title)}
```
"""
    conditions = {name: value for name, value in results.items() if isinstance(value, dict) and "mean" in value}
    if len(conditions) > 1:
        text += f"""
Robustness (the same images JPEG-compressed, blurred or downscaled):

```
{format_comparison_table(conditions, metric="accuracy", title="accuracy per condition")}
```
"""
    return text


def _data_section(eval_dataset: str, license: str, datasets) -> str:
    if not eval_dataset:
        return f"## Training data and licence\n\nNot recorded with this model. The weights are released under `{license}`.\n"
    source = _non_commercial_source(eval_dataset)
    if source:
        terms = (
            f"{source} is licensed CC BY-NC-SA 4.0. These weights are derived from it, so they are for "
            f"**non-commercial use only** and are shared under the same terms (`{license}`)."
        )
    elif eval_dataset == "synthetic":
        terms = (
            "The data is the procedural toy set generated by `mirage_hf.demo.synthetic` (no third-party images). A model "
            "trained on it detects those toy traces, not real generators."
        )
    else:
        terms = f"The weights are released under `{license}`; check that this agrees with the training data's terms."
    named = f" Training data sets: {', '.join(f'`{name}`' for name in datasets)}." if datasets else ""
    return f"""## Training data and licence

Evaluated on `{_dataset_label(eval_dataset)}`; in mirage-hf's protocols the training data comes from the same
source.{named} {terms}
"""


INTENDED_USE = """## Intended use

Screening: flagging images that are likely AI-generated, so that a person looks at them more closely, and
research on detectors that generalise to unseen generators. It is not meant to decide anything about a person
or an image on its own.
"""

LIMITATIONS = """## Limitations

- **Unseen generators.** Detectors miss generators unlike their training data; accuracy on a new generator can
  fall to chance. Check the per-generator table, not only the mean.
- **Compression and resizing.** JPEG re-encoding, resizing, cropping, screenshots and re-photographing move the
  scores, usually towards "real". Social-media copies are all of these.
- **No guarantee.** A high p(fake) is evidence, not proof, that an image is generated, and a low one does not
  prove it is authentic. Do not use a single score as proof of anything.
"""


def _model_card(model_dir: Path, repo_id: str, license, base_model, datasets, space_repo_id) -> ModelCard:
    config = json.loads((model_dir / "config.json").read_text())
    results_path = model_dir / EVAL_RESULTS_FILE
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    eval_dataset = results["eval_dataset"] if results else ""
    license = choose_license(eval_dataset, license)
    base_model = base_model or config.get("clip_name_or_path")
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=TAGS,
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=datasets,
        metrics=list(CARD_METRICS),
        eval_results=_eval_results(results) if results else None,
    )
    base = f"[{base_model}](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else "from a local folder"
    space = ""
    if space_repo_id:
        space = f"\nTry it in the Space [{space_repo_id}](https://huggingface.co/spaces/{space_repo_id}).\n"
    body = f"""# {model_name}

Detects AI-generated images with MiraGe (Shi et al., ACM MM 2025): a frozen CLIP with learnable deep prompts
in its text and image encoders. Base CLIP: {base}. Mode `{config.get("mode")}`, {config.get("n_ctx")} prompt
tokens, depth {config.get("prompt_depth")}. Labels: `real`, `fake`. Trained with mirage-hf {__version__}.
Preprocessing `{config.get("preprocess")}`, which the repo's `preprocessor_config.json` applies: `pipeline()` sees
the pixels the model was calibrated on.
{space}
{_usage_section(repo_id)}
{_calibration_section(config, results)}
{_evaluation_section(results)}
{_onnx_section(model_dir, repo_id, results)}
{INTENDED_USE}
{LIMITATIONS}
{_data_section(eval_dataset, license, datasets)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


ADAPTER_FILES = (ADAPTER_WEIGHTS_NAME, ADAPT_RESULTS_NAME, "config.json", "preprocessor_config.json")


def _adapter_usage(repo_id: str) -> str:
    return f"""## How to use

The adapter holds only what adaptation changed; the `mirage-hf` package loads it on top of its base detector
(downloaded at the recorded revision, and refused if its weights' sha256 differs):

```python
import mirage_hf  # registers MiraGe and its adapters with the Auto classes
from transformers import pipeline

detector = pipeline("image-classification", model="{repo_id}")
detector("photo.jpg")  # [{{'label': 'fake', 'score': ...}}, {{'label': 'real', 'score': ...}}]
```

or `mirage-detect photos/ --model {repo_id}`, or `AutoModelForImageClassification.from_pretrained("{repo_id}")`
(`mirage_hf.from_adapter(MiraGeForImageClassification, folder, base_model=...)` puts a local copy of the downloaded folder on a local copy of the base).
It ships no model code: without `mirage-hf`, `trust_remote_code` cannot load it.
"""


def adapter_card(
    adapter_dir, repo_id: str | None = None, license: str | None = None, name: str | None = None
) -> ModelCard:
    """The model card of an adapter folder: its base detector (card metadata `base_model`, as PEFT adapters
    have), the before/after tables `mirage-adapt` measured, the method, the calibration and any `--force`.
    `name` defaults to the repo's or the folder's."""
    adapter_dir = Path(adapter_dir)
    results = json.loads((adapter_dir / ADAPT_RESULTS_NAME).read_text())
    adapter = MiraGeAdapterConfig.from_pretrained(adapter_dir).to_dict()
    base, revision = adapter["base_model_name_or_path"], adapter["base_model_revision"]
    name = name or (repo_id or adapter_dir.name).split("/")[-1]
    on_hub = _is_hub_id(base)
    data = ModelCardData(
        model_name=name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[*TAGS, "mirage-adapter"],
        base_model=base if on_hub else None,
        base_model_relation="adapter" if on_hub else None,
    )
    base_text = f"[{base}](https://huggingface.co/{base})" if on_hub else f"`{Path(base).name}` (a local folder)"
    images, options = results["images"], results["options"]
    trained = "prompts and couplings" + (f" and a rank-{options['lora_r']} LoRA" if options.get("lora_r") else "")
    anchor = options.get("method", "prompts") == "anchor"
    if anchor:
        trained = "added fake anchor (the prompts and couplings are stored unchanged, so the adapter loads as any)"
    method = (
        f"One fake anchor for `{results['generator']}` was added beside the detector's class anchors (its logit joins "
        "the fake class, so p(fake) = 1 - p(real) over every anchor), placed from the new images and trained alone "
        f"for {options['steps']} steps of AdamW (learning rate {options['learning_rate']:g}, batches of "
        f"{options['batch_size']}, half new fakes and half reals) on the detector's own loss and distillation of its "
        f"p(fake) on the real images (weight {options['distill_weight']:g}); the prompts, class anchors and "
        "calibration are the base detector's"
        if anchor
        else f"{options['steps']} steps of AdamW (learning rate {options['learning_rate']:g}, batches of "
        f"{options['batch_size']}, half new fakes and half reals), starting from the detector's own trained weights, "
        f"on the detector's own loss plus an L2 penalty toward its weights (weight {options['anchor_weight']:g}) and "
        f"distillation of its p(fake) on the real images (weight {options['distill_weight']:g})"
    )
    forced = ""
    if results.get("forced"):
        forced = (
            "\n> **Written with `--force`.** The forgetting guard refused this adapter: "
            + "; ".join(results["refused"])
            + ". Check the tables below before using it.\n"
        )
    tables = [
        f"Reference data `{_dataset_label(results['reference'].split(' [')[0])}` (what the base detector was "
        "evaluated on; the old generators):\n\n```\n"
        + format_before_after(results["before"]["reference"], results["after"]["reference"])
        + "\n```"
        if results["before"]["reference"]
        else "No reference data: forgetting was not measured."
    ]
    if results["before"]["holdout"]:
        tables.append(
            f"Held-out images of `{results['generator']}` ({images['holdout_fakes']} fakes, {images['holdout_reals']} "
            "reals; never trained on):\n\n```\n"
            + format_before_after(results["before"]["holdout"], results["after"]["holdout"])
            + "\n```"
        )
    changes = [value for classes in results["forgetting"]["change"].values() for value in classes.values()]
    worst_text = f"; the largest loss here is {min(changes):+.1f} points" if changes else ""
    calibration = results["calibration"]
    calibration_rule = calibration["rule"]
    body = f"""# {name}

An adapter for the MiraGe detector {base_text} (revision `{revision or "local"}`, weights sha256
`{adapter["base_model_sha256"][:16]}...`) that teaches it the generator `{results["generator"]}` from
{images["fakes"]} of its images and {images["reals"]} real images ({images["train_fakes"]} fakes and
{images["train_reals"]} reals trained on, the rest held out; {images["unreadable"]} unreadable files skipped).
It holds only what adaptation changed, the {trained}: {100 * results["adapter_fraction"]:.2f}% of the detector's
weights. Written by `mirage-adapt` (mirage-hf {__version__}).
{forced}
{_adapter_usage(repo_id or name)}
## Before and after

Accuracy, real accuracy, fake accuracy and AP (fake = positive) in percent, before (the base detector) and after
(base + this adapter), each with its own calibration. The guard allows an old generator to lose at most
{results["forgetting"]["max_forgetting"]:g} points of real accuracy and of fake accuracy, each{worst_text}.

{chr(10).join(f"{table}{chr(10)}" for table in tables)}
## Method

{method}; see mirage-hf's docs/adaptation.md.

Calibration: temperature {calibration["temperature"]:.4g}, threshold {calibration["threshold"]:.4g}; {calibration_rule}.

{INTENDED_USE}
{LIMITATIONS}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _stage_adapter(adapter_dir: Path, target: Path, repo_id: str, license, base_model) -> None:
    """The adapter's files and card; its base must be a Hub repo (`base_model` renames a local base that was
    published; loading still checks the weights' sha256)."""
    adapter = MiraGeAdapterConfig.from_pretrained(adapter_dir)
    base = base_model or adapter.base_model_name_or_path
    if not _is_hub_id(base):
        raise ValueError(
            f"the adapter's base detector {base!r} is a local folder, which the Hub cannot load: publish it first "
            "(mirage-push --model_dir <it>) and pass --base_model <its repo id>"
        )
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} is not a complete adapter folder (missing {missing})")
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter_dir / name, target / name)
    if base_model:
        revision = None if base_model != adapter.base_model_name_or_path else adapter.base_model_revision
        adapter.base_model_name_or_path, adapter.base_model_revision = base_model, revision
        adapter.to_json_file(target / "config.json")
    results = json.loads((adapter_dir / ADAPT_RESULTS_NAME).read_text())
    license = choose_license(results.get("reference") or "", license)
    adapter_card(target, repo_id, license).save(target / "README.md")


def _copy_model_files(model_dir: Path, target: Path) -> None:
    missing = [name for name in REQUIRED_MODEL_FILES if not (model_dir / name).is_file()]
    if missing or not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir} is not an exported MiraGe folder (missing {missing or 'safetensors weights'}); "
            "export it with mirage_hf.model_folder.export_model"
        )
    if "auto_map" not in json.loads((model_dir / "config.json").read_text()):
        raise ValueError(f"{model_dir}/config.json has no auto_map: it would not load with trust_remote_code")
    processor, config = AutoImageProcessor.from_pretrained(model_dir), MiraGeConfig.from_pretrained(model_dir)
    if problem := preprocessing_mismatch(processor, config, model_dir):
        raise ValueError(problem)
    target.mkdir(parents=True)
    for pattern in MODEL_FILES:
        for path in model_dir.glob(pattern):
            shutil.copy2(path, target / path.name)
    if (model_dir / ONNX_DIR / INFO_FILE).is_file():  # written by mirage-export-onnx
        shutil.copytree(model_dir / ONNX_DIR, target / ONNX_DIR)


def _copy_resource(source, target: Path, ignore=()) -> None:
    """Copies a package resource (file or folder, read through importlib.resources) to `target`."""
    if source.is_dir():
        target.mkdir(parents=True)
        for entry in source.iterdir():
            if not any(fnmatch(entry.name, pattern) for pattern in ignore):
                _copy_resource(entry, target / entry.name, ignore)
    else:
        target.write_bytes(source.read_bytes())


def _stage_space(target: Path, repo_id: str) -> None:
    """The Space: app, requirements, examples, README naming the model, and a copy of this package (the Space
    installs only requirements.txt, and mirage-hf is not on PyPI)."""
    target.mkdir(parents=True)
    for name in SPACE_FILES:
        _copy_resource(SPACE_TEMPLATE / name, target / name)
    card = SpaceCard((SPACE_TEMPLATE / "README.md").read_text(encoding="utf-8"))
    card.data.models = [repo_id]
    card.save(target / "README.md")
    _copy_resource(PACKAGE, target / "mirage_hf", ignore=NOT_IN_SPACE_COPY)


def stage_model_repo(
    model_dir, out_dir, repo_id: str, space_repo_id=None, license=None, base_model=None, datasets=None
) -> Path:
    """Writes `out_dir/model` (the model files and README.md model card) and `out_dir/space` (the Gradio Space
    for `repo_id`); returns `out_dir`. `out_dir` must be new or empty, so that nothing stale is pushed."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no model folder {str(model_dir)!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"staging folder {out_dir} is not empty; choose a new one")
    if is_detector_adapter(model_dir):
        _stage_adapter(model_dir, out_dir / "model", repo_id, license, base_model)
    else:
        card = _model_card(model_dir, repo_id, license, base_model, datasets, space_repo_id)
        _copy_model_files(model_dir, out_dir / "model")
        card.save(out_dir / "model" / "README.md")
    _stage_space(out_dir / "space", repo_id)
    return out_dir


def planned_calls(staged_dir, repo_id: str, space_repo_id=None, private: bool = False) -> list[tuple[str, dict]]:
    """The `HfApi` method calls that publish a staged folder, as (method name, keyword arguments)."""
    staged_dir = Path(staged_dir)
    calls = [
        ("create_repo", {"repo_id": repo_id, "repo_type": "model", "private": private, "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": repo_id,
                "repo_type": "model",
                "folder_path": str(staged_dir / "model"),
                "commit_message": "Upload MiraGe detector",
            },
        ),
    ]
    if space_repo_id:
        calls += [
            (
                "create_repo",
                {
                    "repo_id": space_repo_id,
                    "repo_type": "space",
                    "space_sdk": "gradio",
                    "private": private,
                    "exist_ok": True,
                },
            ),
            (
                "upload_folder",
                {
                    "repo_id": space_repo_id,
                    "repo_type": "space",
                    "folder_path": str(staged_dir / "space"),
                    "commit_message": f"Space for {repo_id}",
                },
            ),
        ]
    return calls


def upload(staged_dir, repo_id: str, space_repo_id=None, token=None, private: bool = False) -> list:
    """Creates the repos (if needed) and uploads the staged folders; returns what each `HfApi` call returned.
    With `token=None`, huggingface_hub uses `HF_TOKEN` or the login cache."""
    api = HfApi(token=token)
    calls = planned_calls(staged_dir, repo_id, space_repo_id, private)
    return [getattr(api, name)(**kwargs) for name, kwargs in calls]


def format_calls(calls: list[tuple[str, dict]]) -> str:
    """The calls as Python, the token shown only as where it comes from."""
    lines = ["api = HfApi(token=<redacted: HF_TOKEN or the login cache>)"]
    lines += [f"api.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" for name, kwargs in calls]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Publish a trained MiraGe detector (model repo and Gradio Space).")
    parser.add_argument(
        "--model_dir", required=True, help="Exported model folder (e.g. outputs/demo/model) or mirage-adapt's adapter."
    )
    parser.add_argument("--repo_id", required=True, type=_repo_id, help="Model repo, user/name.")
    parser.add_argument("--space_repo_id", type=_repo_id, help="Also publish a Gradio Space, user/name.")
    parser.add_argument("--license", help="Licence of the weights; defaults to cc-by-nc-sa-4.0 for GenImage data.")
    parser.add_argument(
        "--base_model",
        help="Hub id of the base CLIP (default: the config's clip_name_or_path); for an adapter folder (mirage-adapt), "
        "the Hub id its base detector was published under",
    )
    parser.add_argument("--datasets", nargs="+", help="Hub ids of the training data sets, for the card.")
    parser.add_argument("--private", action="store_true", help="Create private repos.")
    parser.add_argument("--staging_dir", help="New or empty folder to stage into (default: a new temporary one).")
    parser.add_argument("--dry_run", action="store_true", help="Stage and print the Hub calls without making them.")
    args = parser.parse_args(argv)
    try:
        staged = stage_model_repo(
            args.model_dir,
            args.staging_dir or tempfile.mkdtemp(prefix="mirage-push-"),
            args.repo_id,
            space_repo_id=args.space_repo_id,
            license=args.license,
            base_model=args.base_model,
            datasets=args.datasets,
        )
    except (OSError, ValueError) as error:  # no such folder, a licence to choose, a used staging folder: one line
        raise SystemExit(f"{parser.prog}: {error}") from None
    print(f"staged in {staged}")
    if args.dry_run:
        calls = planned_calls(staged, args.repo_id, args.space_repo_id, args.private)
        print("dry run, would call:\n" + format_calls(calls))
        return
    upload(staged, args.repo_id, args.space_repo_id, private=args.private)
    print(f"model: https://huggingface.co/{args.repo_id}")
    if args.space_repo_id:
        print(f"space: https://huggingface.co/spaces/{args.space_repo_id}")
        if args.private:
            print("the model is private: give the Space an HF_TOKEN secret that can read it")
