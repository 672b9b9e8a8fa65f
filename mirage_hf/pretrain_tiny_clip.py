"""Pretrains the tiny CLIP the package ships (mirage_hf/tiny_pretrained_clip) on the captioned world.

    python -m mirage_hf.pretrain_tiny_clip --out DIR [--steps 4000] [--seed 0]

CLIP's own contrastive loss on freshly generated captioned pairs (mirage_hf/caption_world.py), a fixed number of
steps from a fixed seed on one thread, so a rerun on the same software reproduces the weights' sha256. Writes the
checkpoint (safetensors, tokenizer, image processor) and a card (README.md) with what it saw, how long it trained,
its zero-shot numbers and the sha256. Never run inside the demo: the demo loads the shipped result.
"""

import argparse
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from transformers import CLIPModel, get_cosine_schedule_with_warmup

from .caption_world import PRETRAINING_GENERATORS, captioned_pairs, content_scene, render, vocabulary
from .tiny import PROMPT_WORDS, tiny_clip_config, tiny_image_processor, tiny_tokenizer

ARCHITECTURE = dict(image_size=32, patch_size=4, hidden_size=64, num_layers=4, projection_dim=32)
CLASS_PROMPTS = ("a photo of a real.", "a photo of a fake.")  # MiraGe's zero-shot prompts (ctx_init + class name)
DEFAULTS = dict(steps=3000, seed=0, batch_scenes=32, learning_rate=1e-3)


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


def pretrain(steps: int, seed: int, batch_scenes: int, learning_rate: float, log=print):
    """The pretrained (model, tokenizer, processor) and the final loss (mean of the last 100 steps); each step sees
    2 * batch_scenes new captioned images."""
    model, tokenizer, processor = build(seed)
    rng = np.random.default_rng([seed, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    model.train()
    start, losses = time.time(), []
    for step in range(1, steps + 1):
        images, captions, _ = zip(*captioned_pairs(rng, batch_scenes, ARCHITECTURE["image_size"]), strict=True)
        text = tokenizer(list(captions), padding=True, return_tensors="pt")
        loss = model(**text, pixel_values=pixel_values(images, processor), return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {np.mean(losses[-100:]):.4f}  {time.time() - start:.0f} s")
    model.eval()
    return model, tokenizer, processor, float(np.mean(losses[-100:]))


@torch.no_grad()
def class_anchors(model, tokenizer) -> torch.Tensor:
    """The L2-normalised text features of the real and the fake class prompt, (2, projection_dim)."""
    anchors = model.get_text_features(**tokenizer(list(CLASS_PROMPTS), padding=True, return_tensors="pt"))
    return torch.nn.functional.normalize(getattr(anchors, "pooler_output", anchors), dim=-1)


@torch.no_grad()
def fake_scores(model, tokenizer, processor, images: list[np.ndarray]) -> np.ndarray:
    """cos(image, "a photo of a fake.") - cos(image, "a photo of a real."): the zero-shot ranking score."""
    anchors = class_anchors(model, tokenizer)
    feats = model.get_image_features(pixel_values=pixel_values(images, processor))
    feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    return (feats @ (anchors[1] - anchors[0])).numpy()


@torch.no_grad()
def zero_shot(model, tokenizer, processor, n: int = 200, seed: int = 12345) -> dict:
    """Anchor cosine, and zero-shot ROC AUC (fake positive) of each pretraining and each demo generator against
    camera photos, on images no step saw (another seed)."""
    from .synthetic import GENERATORS, synthetic_dataset

    size = ARCHITECTURE["image_size"]
    anchors = class_anchors(model, tokenizer)
    report = {"anchor_cosine": round(float(anchors[0] @ anchors[1]), 3), "pretraining_auc": {}, "demo_auc": {}}
    for i, maker in enumerate(PRETRAINING_GENERATORS):
        rng = np.random.default_rng([seed, i])
        scenes = [content_scene(rng, size)[0] for _ in range(n)]
        reals = [render(rng, img, "camera") for img in scenes[: n // 2]]
        fakes = [render(rng, img, maker) for img in scenes[n // 2 :]]
        report["pretraining_auc"][maker] = _auc(fake_scores(model, tokenizer, processor, reals + fakes), n // 2)
    for generator in GENERATORS:
        rows = synthetic_dataset(n=n, image_size=size, seed=seed, generator=generator)
        images = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows["image"]]
        scores = fake_scores(model, tokenizer, processor, images)
        report["demo_auc"][generator] = round(100 * roc_auc_score(rows["label"], scores), 1)
    return report


def _auc(scores: np.ndarray, n_real: int) -> float:
    labels = np.r_[np.zeros(n_real), np.ones(len(scores) - n_real)]
    return round(100 * roc_auc_score(labels, scores), 1)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


CARD = """# tiny-pretrained-clip

A tiny transformers `CLIPModel` pretrained with CLIP's contrastive loss on a generated world, for mirage-hf's
offline demo and tests (`clip_model: tiny-pretrained`): a small simulation of a web-pretrained CLIP, not a model
of real images. ViT at {image_size} px, patch {patch_size}, width {hidden_size}, {num_layers} layers in each tower,
projection {projection_dim}; {n_params:,} parameters.

**What it saw.** {images:,} generated images with captions ({steps} steps of {batch} new images): scenes with one
named shape (colour, shape, place), each rendered as a camera photo and by one of the pretraining generators
({generators}). Captions name the content and the provenance ("a real photo of a red circle at the left.",
"an image generated by zoomer of a ...", "a photo of a fake ..."). None of the demo's generators was seen. World
and reasons: docs/synthetic-data.md; code: mirage_hf/caption_world.py.

**How.** `python -m mirage_hf.pretrain_tiny_clip --out DIR --steps {steps} --seed {seed} --batch_scenes {batch_scenes}
--learning_rate {learning_rate}`: AdamW, cosine schedule, one thread, {minutes:.0f} min on a shared 2-core CPU.
Final loss (mean of the last 100 steps): {final_loss:.3f}.

**Zero-shot** (prompts "a photo of a real." / "a photo of a fake."; score: cosine to the fake anchor minus
cosine to the real one; {n_eval} unseen images per generator, half of them camera photos):
- cosine between the two anchors: {anchor_cosine}
- ROC AUC on the pretraining generators: {pretraining_auc}
- ROC AUC on the demo's generators (never seen): {demo_auc}

**model.safetensors sha256:** `{sha256}`
"""


def save(model, tokenizer, processor, out: Path, facts: dict) -> dict:
    """Writes the checkpoint, then the card with its zero-shot numbers and checksum; returns the card's facts."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    facts = {
        **facts,
        **zero_shot(model, tokenizer, processor, n=facts["n_eval"]),
        "sha256": sha256(out / "model.safetensors"),
    }
    (out / "pretraining.json").write_text(json.dumps(facts, indent=2) + "\n")
    text = {
        k: (", ".join(f"{g} {v}" for g, v in facts[k].items()) if isinstance(facts[k], dict) else facts[k])
        for k in facts
    }
    (out / "README.md").write_text(CARD.format(**ARCHITECTURE, **text))
    return facts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--n_eval", type=int, default=200, help="images per generator for the zero-shot numbers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same reductions on every run: bit-exact reruns on the same software
    start = time.time()
    model, tokenizer, processor, final_loss = pretrain(
        args.steps, args.seed, args.batch_scenes, args.learning_rate, log=lambda line: print(line, flush=True)
    )
    facts = {
        **{k: getattr(args, k) for k in DEFAULTS}, "n_eval": args.n_eval, "batch": 2 * args.batch_scenes,
        "images": 2 * args.batch_scenes * args.steps, "generators": ", ".join(PRETRAINING_GENERATORS),
        "n_params": sum(p.numel() for p in model.parameters()), "minutes": (time.time() - start) / 60, "final_loss": final_loss,
    }  # fmt: skip
    facts = save(model, tokenizer, processor, args.out, facts)
    print(json.dumps({k: facts[k] for k in ("anchor_cosine", "pretraining_auc", "demo_auc", "sha256")}, indent=2))
    return facts


if __name__ == "__main__":
    main()
