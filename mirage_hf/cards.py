"""The cards a published detector carries: the model card (its `model-index` from the folder's
`eval_results.json`, the licence its training data allows, the usage and ONNX snippets), an adapter's card and the
Space's card. `mirage-push` (hub.py) stages and uploads them; `mirage-adapt` writes an adapter's card beside it.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, SpaceCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from . import __version__
from .adapter_config import MiraGeAdapterConfig
from .adapter_files import ADAPT_RESULTS_NAME
from .inference import DEFAULT_UNSURE_MARGIN
from .metrics import format_before_after, format_comparison_table, format_table
from .model_folder import BACKEND_EVAL_RESULTS_FILE, EVAL_RESULTS_FILE
from .onnx_runtime import INFO_FILE, ONNX_DIR, ONNX_FILES

SPACE_TEMPLATE = files("mirage_hf.space")  # space/ (package data): the Space's app, requirements, card and examples

CARD_METRICS = {
    "accuracy": "Accuracy",
    "average_precision": "Average precision (fake = positive)",
    "roc_auc": "ROC AUC",
    "tpr_at_5_fpr": "TPR at 5% FPR",
}
CARD_DECIMALS = 4  # metric values in the card's model-index (0.8600000000000001 reads as 0.86)
NON_COMMERCIAL_DATA = {"genimage": "GenImage"}  # data set keyword -> name; their licence is CC BY-NC-SA 4.0
TAGS = ["mirage", "ai-generated-image-detection", "deepfake-detection", "clip", "prompt-learning", "mirage-hf"]


def is_repo_id(name: str | None) -> bool:
    """An `owner/name` id by the Hub's own rules (`validate_repo_id`)."""
    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id rather than a local path (the card must not point at, or leak, a local folder)."""
    return is_repo_id(name) and not Path(name).exists()


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
    return eval_dataset if eval_dataset == "synthetic" or is_hub_id(eval_dataset) else Path(eval_dataset).name


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
            "(`mirage-eval --model DIR --backend onnx-int8 --dataset ...` measures it).\n"
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
Accuracy cost of int8 on the evaluation data above (`mirage-eval --backend onnx-int8`), in percent:

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


def model_card(model_dir: Path, repo_id: str, license, base_model, datasets, space_repo_id) -> ModelCard:
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
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=datasets,
        metrics=list(CARD_METRICS),
        eval_results=_eval_results(results) if results else None,
    )
    base = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else "from a local folder"
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


def _adaptation_method(results: dict) -> tuple[str, str]:
    """What an adapter holds and how it was trained, in the card's words."""
    options = results["options"]
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
    return trained, method


def _adapter_tables(results: dict) -> list[str]:
    """The before/after tables: the reference data (forgetting) and the new generator's held-out images."""
    images = results["images"]
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
    return tables


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
    on_hub = is_hub_id(base)
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
    images, calibration = results["images"], results["calibration"]
    trained, method = _adaptation_method(results)
    forced = ""
    if results.get("forced"):
        forced = (
            "\n> **Written with `--force`.** The forgetting guard refused this adapter: "
            + "; ".join(results["refused"])
            + ". Check the tables below before using it.\n"
        )
    tables = _adapter_tables(results)
    changes = [value for classes in results["forgetting"]["change"].values() for value in classes.values()]
    worst_text = f"; the largest loss here is {min(changes):+.1f} points" if changes else ""
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


def space_card(repo_id: str) -> SpaceCard:
    """The Space's card: the template's README.md, naming the model it serves."""
    card = SpaceCard((SPACE_TEMPLATE / "README.md").read_text(encoding="utf-8"))
    card.data.models = [repo_id]
    return card
