"""Pretrains the tiny CLIP the package ships (mirage_hf/demo/tiny_pretrained_clip) on the captioned world.

    python -m mirage_hf.demo.pretrain_tiny_clip --out DIR [--steps 4000] [--seed 0]

CLIP's own contrastive loss on freshly generated captioned pairs (mirage_hf/demo/caption_world.py), a fixed number of
steps from a fixed seed on one thread, so a rerun on the same software reproduces the weights' sha256. Writes the
checkpoint (safetensors, tokenizer, image processor) and a card (README.md) with what it saw, how long it trained,
its zero-shot numbers and the sha256. Never run inside the demo: the demo loads the shipped result.
"""

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from sklearn.metrics import roc_auc_score
from transformers import CLIPModel

from ..engine import Engine, Optimisation, Task, TrainingLog, TrainState
from ..file_hashes import sha256_of_files
from ..parameters import trainable_parameters
from .caption_world import PRETRAINING_GENERATORS, caption, captioned_pairs, content_scene, render, vocabulary
from .tiny import PROMPT_WORDS, tiny_clip_config, tiny_image_processor, tiny_tokenizer

ARCHITECTURE = dict(image_size=32, patch_size=4, hidden_size=64, num_layers=4, projection_dim=32)
CLASS_PROMPTS = ("a photo of a real.", "a photo of a fake.")  # MiraGe's zero-shot prompts (ctx_init + class name)
DEFAULTS = dict(steps=3000, seed=0, batch_scenes=32, learning_rate=1e-3)
GATE = dict(pair_accuracy=0.95, probe_auc=95.0, zero_shot_auc=90.0)  # what a backbone must show before any demo run
CURVE_EVERY, CURVE_SCENES = 250, 128  # the held-out batch logged during pretraining


def words() -> list[str]:
    return sorted({*vocabulary(), *PROMPT_WORDS})


def build(seed: int):
    """A random tiny CLIP whose tokenizer knows every caption word and the class prompts, with its processor."""
    torch.manual_seed(seed)
    config = tiny_clip_config(**ARCHITECTURE, words=words(), max_text_length=24)
    return CLIPModel(config), tiny_tokenizer(words()), tiny_image_processor(ARCHITECTURE["image_size"])


def pixel_values(images: list[np.ndarray], processor) -> torch.Tensor:
    """uint8 (H, W, 3) arrays at the model's size, rescaled and normalised as the image processor does."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    return (x - mean) / std


def pretrain(steps: int, seed: int, batch_scenes: int, learning_rate: float, log=print, curve: list | None = None):
    """The pretrained (model, tokenizer, processor) and the final loss (mean of the last 100 steps); each step sees
    2 * batch_scenes new captioned images. With `curve`, appends pair accuracy and content retrieval on a fixed
    held-out batch every CURVE_EVERY steps (no randomness of the run is touched, so the weights stay the same).
    On the CPU: the recipe's weights are reproducible there, bit for bit."""
    model, tokenizer, processor = build(seed)
    rng = np.random.default_rng([seed, 1])
    heldout = heldout_pairs(np.random.default_rng([seed, 2]), CURVE_SCENES) if curve is not None else None
    accelerator = Accelerator(cpu=True)

    def captioned_batches(state):  # endless: each step's new captioned pairs
        while True:
            images, captions, _ = zip(*captioned_pairs(rng, batch_scenes, ARCHITECTURE["image_size"]), strict=True)
            yield tokenizer(list(captions), padding=True, return_tensors="pt"), pixel_values(images, processor)

    def clip_loss(model, batch):
        text, pixels = batch
        return model(**text, pixel_values=pixels, return_loss=True)

    task = Task(model, list(trainable_parameters(model).values()), clip_loss)
    optimisation = Optimisation(
        learning_rate, steps, max(1, steps // 20), weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=1.0
    )
    engine, state = Engine(accelerator, task, optimisation), TrainState()
    start, losses = time.time(), []

    def report(output, state, last, epoch_done):
        step = state.global_step
        losses.append(output["loss"].item())
        if step % 100 == 0 or last:
            log(f"step {step}/{steps}  loss {np.mean(losses[-100:]):.4f}  {time.time() - start:.0f} s")
        if heldout is not None and (step % CURVE_EVERY == 0 or last):
            model.eval()
            curve.append(
                {
                    "step": step,
                    "loss": round(float(np.mean(losses[-100:])), 4),
                    **caption_matching(model, tokenizer, processor, heldout),
                }
            )
            model.train()
            log(
                f"  held-out: pair accuracy {curve[-1]['pair_accuracy']:.3f}, content retrieval {curve[-1]['content_retrieval']:.3f}"
            )

    engine.train(
        captioned_batches, state, TrainingLog(accelerator, 100, steps, state, desc="pretrain"), after_step=report
    )
    model.eval()
    return model, tokenizer, processor, float(np.mean(losses[-100:]))


@torch.no_grad()
def class_anchors(model, tokenizer) -> torch.Tensor:
    """The L2-normalised text features of the real and the fake class prompt, (2, projection_dim)."""
    return text_features(model, tokenizer, list(CLASS_PROMPTS))


@torch.no_grad()
def image_features(model, processor, images: list[np.ndarray]) -> torch.Tensor:
    feats = model.get_image_features(pixel_values=pixel_values(images, processor))
    return torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    feats = model.get_text_features(**tokenizer(list(texts), padding=True, return_tensors="pt"))
    return torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)


# --------------------------------------------------------------------------- the gate, on held-out pretraining images


def heldout_pairs(rng: np.random.Generator, n_scenes: int) -> list[dict]:
    """n_scenes scenes, each as a camera photo and by a pretraining generator (taken in turn, so each appears
    equally often), with their captions and content."""
    makers = list(PRETRAINING_GENERATORS)
    pairs = []
    for i in range(n_scenes):
        img, content = content_scene(rng, ARCHITECTURE["image_size"])
        maker = makers[i % len(makers)]
        pairs.append({
            "content": content, "maker": maker,
            "images": [render(rng, img, "camera"), render(rng, img, maker)],
            "captions": [caption(rng, content, "camera"), caption(rng, content, maker)],
        })  # fmt: skip
    return pairs


@torch.no_grad()
def caption_matching(model, tokenizer, processor, pairs: list[dict], group: int = 32) -> dict:
    """pair_accuracy: each image picks between its scene's camera and generated caption (chance 0.5);
    content_retrieval: each camera photo picks among the camera captions of `group` scenes, right when the picked
    caption names its content (chance about 1/group)."""
    images = image_features(model, processor, [im for p in pairs for im in p["images"]]).view(len(pairs), 2, -1)
    texts = text_features(model, tokenizer, [c for p in pairs for c in p["captions"]]).view(len(pairs), 2, -1)
    sims = torch.einsum("pid,pjd->pij", images, texts)  # (pair, image, caption)
    pair_accuracy = float(
        ((sims[:, 0, 0] > sims[:, 0, 1]).float().mean() + (sims[:, 1, 1] > sims[:, 1, 0]).float().mean()) / 2
    )
    hits = []
    for start in range(0, len(pairs) - group + 1, group):
        chunk = pairs[start : start + group]
        picked = (images[start : start + group, 0] @ texts[start : start + group, 0].T).argmax(1)
        hits += [chunk[int(j)]["content"] == p["content"] for j, p in zip(picked, chunk, strict=True)]
    return {"pair_accuracy": round(pair_accuracy, 4), "content_retrieval": round(float(np.mean(hits)), 4)}


@torch.no_grad()
def probe_auc(model, processor, n_train: int = 500, n_test: int = 300, seed: int = 54321) -> dict:
    """ROC AUC (x100) of a logistic-regression probe on the image features, camera vs each pretraining generator,
    trained on n_train and scored on n_test held-out images (half of each camera photos)."""
    from sklearn.linear_model import LogisticRegression

    size, report = ARCHITECTURE["image_size"], {}
    for i, maker in enumerate(PRETRAINING_GENERATORS):
        rng = np.random.default_rng([seed, i])
        n = n_train + n_test
        makers = ["camera", maker] * (n // 2)
        feats = image_features(model, processor, [render(rng, content_scene(rng, size)[0], m) for m in makers]).numpy()
        labels = np.array([m != "camera" for m in makers])
        probe = LogisticRegression(max_iter=5000).fit(feats[:n_train], labels[:n_train])
        report[maker] = round(100 * roc_auc_score(labels[n_train:], probe.decision_function(feats[n_train:])), 1)
    return report


def gate(model, tokenizer, processor, n_pairs: int = 600, seed: int = 2024) -> dict:
    """The pretraining gate on images no step saw: caption matching on n_pairs held-out scenes, probe and zero-shot
    ROC AUC per pretraining generator, and whether every number meets GATE."""
    report = {
        **caption_matching(model, tokenizer, processor, heldout_pairs(np.random.default_rng([seed, 0]), n_pairs)),
        "probe_auc": probe_auc(model, processor),
        "zero_shot_auc": pretraining_zero_shot(model, tokenizer, processor),
    }
    report["gate_passed"] = bool(
        report["pair_accuracy"] >= GATE["pair_accuracy"]
        and min(report["probe_auc"].values()) >= GATE["probe_auc"]
        and min(report["zero_shot_auc"].values()) >= GATE["zero_shot_auc"]
    )
    return report


@torch.no_grad()
def fake_scores(model, tokenizer, processor, images: list[np.ndarray]) -> np.ndarray:
    """cos(image, "a photo of a fake.") - cos(image, "a photo of a real."): the zero-shot ranking score."""
    anchors = class_anchors(model, tokenizer)
    return (image_features(model, processor, images) @ (anchors[1] - anchors[0])).numpy()


@torch.no_grad()
def pretraining_zero_shot(model, tokenizer, processor, n: int = 200, seed: int = 12345) -> dict:
    """Zero-shot ROC AUC (x100, fake positive) of each pretraining generator against camera photos, on n images no
    step saw (another seed), half of them camera photos."""
    size, report = ARCHITECTURE["image_size"], {}
    for i, maker in enumerate(PRETRAINING_GENERATORS):
        rng = np.random.default_rng([seed, i])
        scenes = [content_scene(rng, size)[0] for _ in range(n)]
        reals = [render(rng, img, "camera") for img in scenes[: n // 2]]
        fakes = [render(rng, img, maker) for img in scenes[n // 2 :]]
        report[maker] = _auc(fake_scores(model, tokenizer, processor, reals + fakes), n // 2)
    return report


@torch.no_grad()
def zero_shot(model, tokenizer, processor, n: int = 200, seed: int = 12345) -> dict:
    """Anchor cosine, and zero-shot ROC AUC (fake positive) of each demo generator against its real images; the
    demo's generators were never seen, so these are reported, never used to choose a recipe."""
    from .synthetic import GENERATORS, synthetic_dataset

    size = ARCHITECTURE["image_size"]
    anchors = class_anchors(model, tokenizer)
    report = {"anchor_cosine": round(float(anchors[0] @ anchors[1]), 3), "demo_auc": {}}
    for generator in GENERATORS:
        rows = synthetic_dataset(n=n, image_size=size, seed=seed, generator=generator)
        images = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows["image"]]
        scores = fake_scores(model, tokenizer, processor, images)
        report["demo_auc"][generator] = round(100 * roc_auc_score(rows["label"], scores), 1)
    return report


def _auc(scores: np.ndarray, n_real: int) -> float:
    labels = np.r_[np.zeros(n_real), np.ones(len(scores) - n_real)]
    return round(100 * roc_auc_score(labels, scores), 1)


CARD = """# tiny-pretrained-clip

A tiny transformers `CLIPModel` pretrained with CLIP's contrastive loss on a generated world, for mirage-hf's
offline demo and tests (`clip_model: tiny-pretrained`): a small simulation of a web-pretrained CLIP, not a model
of real images. ViT at {image_size} px, patch {patch_size}, width {hidden_size}, {num_layers} layers in each tower,
projection {projection_dim}; {n_params:,} parameters.

**What it saw.** {images:,} generated images with captions ({steps} steps of {batch} new images): scenes with one
named shape (colour, shape, place), each rendered as a camera photo and by one of the pretraining generators
({generators}). Captions name the content and the provenance ("a real photo of a red circle at the left.",
"an image generated by zoomer of a ...", "a photo of a fake ..."). None of the demo's generators was seen. World
and reasons: docs/synthetic-data.md; code: mirage_hf/demo/caption_world.py.

**How.** `python -m mirage_hf.demo.pretrain_tiny_clip --out DIR --steps {steps} --seed {seed} --batch_scenes {batch_scenes}
--learning_rate {learning_rate}`: AdamW, cosine schedule, one thread, {minutes:.0f} min on a shared 2-core CPU.
Final loss (mean of the last 100 steps): {final_loss:.3f}.

**Pretraining gate** (on images of its own world that no step saw; {gate_verdict}):
- pair accuracy (the right caption of a scene's camera photo and its generated rendering, {n_pairs} scenes):
  {pair_accuracy} (gate >= {gate_pair})
- content retrieval (the right scene's camera caption among 32): {content_retrieval}
- linear-probe ROC AUC, camera vs each pretraining generator (500 train / 300 test images): {probe_auc}
  (gate >= {gate_probe} for every one)
- zero-shot ROC AUC with the class prompts ("a photo of a real." / "a photo of a fake."; score: cosine to the
  fake anchor minus cosine to the real one; {n_eval} images per generator, half camera photos): {zero_shot_auc}
  (gate >= {gate_zero_shot} for every one)

**Reported, never used to choose a recipe:** cosine between the two anchors {anchor_cosine}; zero-shot ROC AUC on
the demo's generators (never seen): {demo_auc}.

The held-out curve during pretraining (a fixed batch of {curve_scenes} scenes, every {curve_every} steps):
![pair accuracy and content retrieval during pretraining](curve.svg)

**model.safetensors sha256:** `{sha256}`
"""


def curve_svg(curve: list[dict], width: int = 640, height: int = 320) -> str:
    """The held-out curve (pair accuracy and content retrieval against steps) as a small SVG line chart."""
    left, right, top, bottom = 48, 16, 16, 40
    last = max(point["step"] for point in curve)

    def xy(step: float, value: float) -> str:
        x = left + (width - left - right) * step / last
        return f"{x:.1f},{top + (height - top - bottom) * (1 - value):.1f}"

    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12"><rect width="100%" height="100%" fill="white"/>'
    ]
    for value in (0, 0.25, 0.5, 0.75, 1):
        lines.append(f'<polyline points="{xy(0, value)} {xy(last, value)}" stroke="#ddd" fill="none"/>')
        lines.append(f'<text x="{left - 6}" y="{xy(0, value).split(",")[1]}" text-anchor="end">{value:g}</text>')
    gate = GATE["pair_accuracy"]
    lines.append(
        f'<polyline points="{xy(0, gate)} {xy(last, gate)}" stroke="#1a7f37" stroke-dasharray="4 3" fill="none"/>'
    )
    for key, colour in (("pair_accuracy", "#cf222e"), ("content_retrieval", "#0969da")):
        points = " ".join(xy(point["step"], point[key]) for point in curve)
        lines.append(f'<polyline points="{points}" stroke="{colour}" stroke-width="2" fill="none"/>')
    legend = (("pair accuracy", "#cf222e"), ("content retrieval (of 32)", "#0969da"), (f"gate {gate}", "#1a7f37"))
    for i, (label, colour) in enumerate(legend):
        lines.append(f'<text x="{left + 10 + 190 * i}" y="{height - 8}" fill="{colour}">{label}</text>')
    lines.append(f'<text x="{width - right}" y="{height - 24}" text-anchor="end">step {last}</text></svg>')
    return "\n".join(lines) + "\n"


def save(model, tokenizer, processor, out: Path, facts: dict) -> dict:
    """Writes the checkpoint, then the card with its zero-shot numbers and checksum; returns the card's facts."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    facts = {
        **facts,
        **gate(model, tokenizer, processor, n_pairs=facts["n_pairs"]),
        **zero_shot(model, tokenizer, processor, n=facts["n_eval"]),
        "sha256": sha256_of_files([out / "model.safetensors"], with_names=False),
    }
    write_card(out, facts)
    return facts


def write_card(out: Path, facts: dict) -> None:
    """pretraining.json (every fact), curve.svg and the card (README.md) of a pretrained folder, from its facts."""
    (out / "pretraining.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "curve.svg").write_text(curve_svg(facts["curve"]))
    text = {
        k: (", ".join(f"{g} {v}" for g, v in facts[k].items()) if isinstance(facts[k], dict) else facts[k])
        for k in facts
    }
    verdict = "passed" if facts["gate_passed"] else "NOT passed"
    gate_text = {f"gate_{k.removesuffix('_auc').removesuffix('_accuracy')}": v for k, v in GATE.items()}
    card = CARD.format(
        **ARCHITECTURE, **text, **gate_text, gate_verdict=verdict, curve_scenes=CURVE_SCENES, curve_every=CURVE_EVERY
    )
    (out / "README.md").write_text(card)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--n_eval", type=int, default=200, help="images per generator for the zero-shot numbers")
    parser.add_argument("--n_pairs", type=int, default=600, help="held-out scenes for the gate's pair accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same reductions on every run: bit-exact reruns on the same software
    start, curve = time.time(), []
    model, tokenizer, processor, final_loss = pretrain(
        args.steps,
        args.seed,
        args.batch_scenes,
        args.learning_rate,
        log=lambda line: print(line, flush=True),
        curve=curve,
    )
    facts = {
        **{k: getattr(args, k) for k in DEFAULTS}, "n_eval": args.n_eval, "batch": 2 * args.batch_scenes,
        "images": 2 * args.batch_scenes * args.steps, "generators": ", ".join(PRETRAINING_GENERATORS),
        "n_params": sum(p.numel() for p in model.parameters()), "minutes": (time.time() - start) / 60, "final_loss": final_loss,
        "n_pairs": args.n_pairs, "curve": curve,
    }  # fmt: skip
    facts = save(model, tokenizer, processor, args.out, facts)
    keys = (
        "pair_accuracy",
        "content_retrieval",
        "probe_auc",
        "zero_shot_auc",
        "gate_passed",
        "anchor_cosine",
        "demo_auc",
        "sha256",
    )
    print(json.dumps({k: facts[k] for k in keys}, indent=2))
    return facts


if __name__ == "__main__":
    main()
