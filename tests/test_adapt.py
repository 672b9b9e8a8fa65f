"""mirage-adapt: adapting a trained detector to a new generator, the adapter folder and how it loads, the
forgetting guard, publishing, and bad input."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killed_after_checkpoint, reset_accelerator_state, scaled_p_fake, with_threshold
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageClassification, pipeline
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from mirage_hf import MiraGeForImageClassification, from_adapter, from_clip
from mirage_hf.adaptation import AdaptError, AdaptOptions, adapt, effect_warnings, image_rows, main, reference_rows
from mirage_hf.adapter_files import ADAPT_RESULTS_NAME, ADAPTER_WEIGHTS_NAME
from mirage_hf.checkpoints import frozen_base_fingerprint
from mirage_hf.cli import main as detect
from mirage_hf.data import FAKE, REAL
from mirage_hf.demo.synthetic import make_synthetic_genimage
from mirage_hf.engine import Checkpointing
from mirage_hf.inference import Detector
from mirage_hf.transforms import open_image

FAST = AdaptOptions(steps=3, batch_size=8, eval_batch_size=32, holdout=0.25, generator="diffusion")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Generated images in the GenImage layout: the new generator's fakes and reals to adapt on (train split) and
    the reference data (val split, both generators)."""
    return make_synthetic_genimage(
        tmp_path_factory.mktemp("world"), generators=["upsampler", "diffusion"], n_train_per_class=12,
        n_val_per_class=6, image_size=32,
    )  # fmt: skip


def folder_of(world, label, split="train", generator="diffusion"):
    return world / generator / split / ("ai" if label == FAKE else "nature")


def rows_of(folder, label):
    return image_rows(sorted(folder.glob("*.png")), label, "")


def run_adapt(detector_dir, world, options=FAST, fakes=None, reals=None, **kwargs):
    fakes = rows_of(folder_of(world, FAKE), FAKE) if fakes is None else fakes
    reals = rows_of(folder_of(world, REAL), REAL) if reals is None else reals
    reference = f"genimage:{world}"
    return adapt(
        str(detector_dir), fakes, reals, options, reference=reference, reference_split="val", quiet=True, **kwargs
    )


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def adapt_argv(detector_dir, world, output, *extra):
    return (
        detector_dir, "--fakes", folder_of(world, FAKE), "--reals", folder_of(world, REAL), "--reference",
        f"genimage:{world}", "--generator", "diffusion", "--steps", 2, "--batch_size", 8, "--output", output, "-q",
        *extra,
    )  # fmt: skip


def logits(model, pixel_values):
    with torch.no_grad():
        return model.eval()(pixel_values=pixel_values).logits


@pytest.fixture(scope="module")
def adapted(detector_dir, world, tmp_path_factory):
    adaptation = run_adapt(detector_dir, world)
    return adaptation, adaptation.save(tmp_path_factory.mktemp("adapted") / "diffusion-adapter", force=True)


def test_adapter_holds_what_changed_and_loads_like_a_detector(adapted, detector_dir, pixel_values, world):
    adaptation, folder = adapted
    expected = logits(adaptation.model, pixel_values)
    base = MiraGeForImageClassification.from_pretrained(detector_dir)
    assert not torch.allclose(expected, logits(base, pixel_values))  # adaptation changed the detector
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, "pt") as handle:  # the prompts (unchanged) and the added anchor
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    trained = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(stored) == trained | {"added_anchors.directions", "added_anchors.offsets"}
    for name, param in base.named_parameters():
        if name in trained:
            torch.testing.assert_close(stored[name], param.detach(), rtol=0, atol=0)
    assert 0 < adaptation.results["adapter_fraction"] < 0.1
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(detector_dir) and len(recorded["base_model_sha256"]) == 64

    for loaded in (
        AutoModelForImageClassification.from_pretrained(folder),
        AutoModel.from_pretrained(folder),
        from_adapter(MiraGeForImageClassification, folder),
    ):
        torch.testing.assert_close(logits(loaded, pixel_values), expected)
        assert loaded.config.decision_threshold == adaptation.model.config.decision_threshold
        assert loaded.mirage_adapter["base_model"] == str(detector_dir)

    image = sorted(folder_of(world, FAKE, "val").glob("*.png"))[0]
    detector = Detector.from_pretrained(folder, device="cpu")
    p_fake = float(detector.p_fake([Image.open(image)])[0])
    scores = pipeline("image-classification", model=str(folder))(str(image))  # one score and verdict everywhere
    assert {row["label"]: row["score"] for row in scores}["fake"] == pytest.approx(p_fake, abs=1e-5)
    assert scores[0]["label"] == ("fake" if p_fake >= 0.5 else "real") == detector([image])[0].label
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert detect([str(image), "--model", str(folder), "--format", "json", "-q"]) == 0
    assert json.loads(out.getvalue())[0]["p_fake"] == pytest.approx(p_fake, abs=1e-4)


def test_the_adapter_card_and_results_hold_the_before_after_table_and_the_base(adapted, detector_dir):
    adaptation, folder = adapted
    results = json.loads((folder / ADAPT_RESULTS_NAME).read_text())
    assert set(results["before"]["reference"]) == {"upsampler", "diffusion", "mean", "all"}
    assert results["new_generator"]["subset"] == "diffusion"  # measured on the reference subset of that name
    assert set(results["forgetting"]["change"]) == {"upsampler"}  # the old generators: all but the new one
    assert results["images"]["train_fakes"] == 9 and results["images"]["holdout_fakes"] == 3
    card = (folder / "README.md").read_text()
    assert "Acc before" in card and "upsampler" in card and "mirage-adapter" in card
    assert results["base_model"]["sha256"] in card or results["base_model"]["sha256"][:16] in card


def test_lora_adapter_round_trip(detector_dir, world, pixel_values, tmp_path):
    options = AdaptOptions(steps=2, batch_size=8, holdout=0.0, lora_r=2, learning_rate=0.05, method="prompts")
    adaptation = run_adapt(detector_dir, world, options)
    folder = adaptation.save(tmp_path / "lora-adapter", force=True)
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, "pt") as handle:
        names = set(handle.keys())
    assert any(name.startswith("lora.") and "lora_B" in name for name in names)
    assert json.loads((folder / "config.json").read_text())["lora"]["r"] == 2
    expected = logits(adaptation.model, pixel_values)
    torch.testing.assert_close(logits(AutoModelForImageClassification.from_pretrained(folder), pixel_values), expected)


def test_adaptation_pulls_the_new_fakes_away_from_the_reals(detector_dir, world):
    """What training guarantees on any model: its own objective improves on the images it trains on."""
    fakes, reals = rows_of(folder_of(world, FAKE), FAKE), rows_of(folder_of(world, REAL), REAL)
    options = AdaptOptions(
        steps=30,
        batch_size=8,
        holdout=0.0,
        learning_rate=0.02,
        lora_r=4,
        anchor_weight=0,
        distill_weight=0,
        method="prompts",
    )
    adaptation = run_adapt(detector_dir, world, options, fakes=fakes, reals=reals)
    train_rows = [dict(row, subset="train") for row in fakes + reals]
    from accelerate import Accelerator

    from mirage_hf.adaptation import measure
    from mirage_hf.transforms import Preprocessor

    base = MiraGeForImageClassification.from_pretrained(detector_dir)
    preprocess = Preprocessor(adaptation.image_processor, base.config.preprocess)
    auc = {
        name: measure(model, train_rows, preprocess, Accelerator(cpu=True), 64)["train"]["roc_auc"]
        for name, model in (("before", base), ("after", adaptation.model))
    }
    assert auc["after"] > auc["before"] + 0.1


def test_an_added_anchor_catches_new_fakes_the_base_calls_real_and_only_raises_p_fake(detector_dir, world, tmp_path):
    """The default method adds a fake anchor and trains it alone. New fakes that the base calls real (noise with a red
    cast, the threshold moved above every score) are caught on the images it learned from, the reals stay
    real; every image's p(fake) can only rise over the base's (its logit joins the fake class by logsumexp), and
    the prompts, class anchors and calibration stay the base's."""
    from accelerate import Accelerator

    from mirage_hf.evaluation import predict
    from mirage_hf.transforms import Preprocessor

    rng = np.random.default_rng(0)
    images = {FAKE: tmp_path / "red", REAL: tmp_path / "noise"}
    for label, folder in images.items():
        folder.mkdir()
        for index in range(16):
            pixels = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
            if label == FAKE:  # a generator with a colour cast
                pixels[..., 0], pixels[..., 1:] = pixels[..., 0] // 3 + 150, pixels[..., 1:] // 4
            Image.fromarray(pixels).save(folder / f"{index}.png")
    rows = {label: rows_of(folder, label) for label, folder in images.items()}
    every = [dict(row, subset="new") for label in (FAKE, REAL) for row in rows[label]]
    every += [dict(row, subset=generator) for label in (FAKE, REAL) for generator in ("diffusion", "upsampler")
              for row in rows_of(folder_of(world, label, "val", generator), label)]  # fmt: skip
    base = MiraGeForImageClassification.from_pretrained(detector_dir)
    preprocess = Preprocessor(AutoImageProcessor.from_pretrained(detector_dir), base.config.preprocess)
    threshold = float(scaled_p_fake(detector_dir, [open_image(row["image"]["path"]) for row in every]).max())
    strict = with_threshold(detector_dir, tmp_path / "strict", min(0.999, threshold + (1 - threshold) / 2))

    options = AdaptOptions(steps=60, batch_size=8, holdout=0.0, generator="new")
    adaptation = adapt(str(strict), rows[FAKE], rows[REAL], options, measure_forgetting=False, quiet=True)
    base = MiraGeForImageClassification.from_pretrained(strict)
    torch.testing.assert_close(adaptation.model.text_anchors(), base.text_anchors(), rtol=0, atol=0)
    assert adaptation.model.config.decision_threshold == base.config.decision_threshold
    p_fake = {name: predict(model, every, preprocess, Accelerator(cpu=True), 64).p_fake
              for name, model in (("base", base), ("adapted", adaptation.model))}  # fmt: skip
    assert (p_fake["base"] < 0.5).all()  # the base calls every image real
    assert (p_fake["adapted"] >= p_fake["base"] - 1e-6).all()
    new_fakes, new_reals = p_fake["adapted"][:16], p_fake["adapted"][16:32]
    assert (new_fakes >= 0.5).mean() >= 0.9 and (new_reals < 0.5).mean() >= 0.9


@pytest.mark.parametrize("lost", ["real_accuracy", "fake_accuracy"])
def test_the_guard_refuses_forgetting_hidden_in_one_class_and_force_writes_it_with_a_note(
    detector_dir, world, tmp_path, monkeypatch, lost
):
    """After adaptation, upsampler's accuracy in one class is 5 points below before while its overall accuracy
    rose: the guard reads each class."""
    import mirage_hf.adaptation as adapt_module

    measured, before = adapt_module.measure, {}

    def losing_upsampler(model, rows, *args, **kwargs):
        results = measured(model, rows, *args, **kwargs)
        if "upsampler" in results:
            if getattr(model, "_after", False):
                changed = {lost: before[lost] - 0.05, "accuracy": before["accuracy"] + 0.01}
                results["upsampler"] = dict(before, **changed)
            else:
                before.update(results["upsampler"])
        return results

    original_train = adapt_module.train

    def mark_trained(model, *args, **kwargs):
        log = original_train(model, *args, **kwargs)
        adapt_module.mirage_core(model)._after = True
        return log

    monkeypatch.setattr(adapt_module, "measure", losing_upsampler)
    monkeypatch.setattr(adapt_module, "train", mark_trained)
    output = tmp_path / "refused"
    code, out, err = cli(*adapt_argv(detector_dir, world, output))
    assert code == 3 and not output.exists()
    assert f"upsampler lost 5.0 points of {lost.replace('_', ' ')} (margin 2)" in err and "nothing written" in err
    assert err.count("lost") == 1  # the other class and the overall accuracy did not lose
    assert "Acc before" in out and "-5.0" in out  # the table that says why is printed, with the change per class
    assert "%|" not in err and "eval" not in err  # -q: no progress bars

    code, _, err = cli(*adapt_argv(detector_dir, world, output, "--force"))
    assert code == 0 and "--force" in err
    assert "Written with `--force`" in (output / "README.md").read_text()
    assert json.loads((output / ADAPT_RESULTS_NAME).read_text())["forced"] is True


def test_effect_warnings_catch_a_no_op_and_reals_passed_as_fakes():
    metrics = lambda fake, auc: {"fake_accuracy": fake, "roc_auc": auc}  # noqa: E731
    assert effect_warnings(metrics(0.1, 0.5), metrics(0.9, 0.99)) == []
    assert any("did not learn" in note for note in effect_warnings(metrics(0.1, 0.5), metrics(0.12, 0.7)))
    assert any("lowered the fake accuracy" in note and "by 7.0 points" in note
               for note in effect_warnings(metrics(0.3, 0.5), metrics(0.23, 0.7)))  # fmt: skip
    assert any("chance" in note for note in effect_warnings(metrics(0.1, 0.5), metrics(0.5, 0.52)))
    assert any("already" in note for note in effect_warnings(metrics(0.95, 0.99), metrics(0.96, 0.99)))


# ================================================================================================ bad input


def test_no_images_found_is_a_one_line_error(detector_dir, world, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(detector_dir, "--fakes", tmp_path / "empty", "--output", tmp_path / "out")
    assert code == 1 and "no images found" in err and not (tmp_path / "out").exists()
    code, _, err = cli(detector_dir, "--output", tmp_path / "out")
    assert code == 1 and "--fakes" in err


def test_undecodable_images_are_reported_and_skipped(detector_dir, world, tmp_path):
    fakes = tmp_path / "fakes"
    shutil.copytree(folder_of(world, FAKE), fakes)
    (fakes / "broken.png").write_bytes(b"not a png at all")
    (fakes / "cut.png").write_bytes(next(fakes.glob("diff*.png")).read_bytes()[:200])
    output = tmp_path / "out"
    code, _, err = cli(*adapt_argv(detector_dir, world, output, "--force"), "--fakes", fakes)
    assert code == 0, err
    assert "2 image(s) could not be loaded" in err and "broken.png" in err
    images = json.loads((output / ADAPT_RESULTS_NAME).read_text())["images"]
    assert images["unreadable"] == 2 and images["fakes"] == 12

    only_broken = tmp_path / "only-broken"
    only_broken.mkdir()
    (only_broken / "broken.png").write_bytes(b"junk")
    code, _, err = cli(detector_dir, "--fakes", only_broken, "--output", tmp_path / "never")
    assert code == 1 and "no readable image" in err


def test_too_few_fakes_are_refused_saying_how_many_are_needed(detector_dir, world, tmp_path):
    """One readable fake among broken files: nothing to hold out, nothing written, unless --force."""
    fakes = tmp_path / "bad"
    fakes.mkdir()
    shutil.copy(next(folder_of(world, FAKE).glob("*.png")), fakes / "good.png")
    for index in range(4):
        (fakes / f"broken{index}.png").write_bytes(b"not a png")
    output = tmp_path / "out"
    code, _, err = cli(*adapt_argv(detector_dir, world, output), "--fakes", fakes)
    assert code == 1 and not output.exists()
    assert "1 readable image(s) of the new generator (1 to train, 0 held out)" in err
    assert "needs at least 10 (8 to train and 2 to hold out at --holdout 0.2)" in err
    assert "4 image(s) could not be loaded" in err and "--force" in err
    code, _, err = cli(*adapt_argv(detector_dir, world, output, "--force"), "--fakes", fakes)
    assert code == 0 and "adapted with --force on 1 readable image(s)" in err
    assert json.loads((output / ADAPT_RESULTS_NAME).read_text())["images"]["train_fakes"] == 1


def test_a_missing_detector_folder_is_named(world, tmp_path):
    code, _, err = cli(tmp_path / "no-such-detector", "--fakes", folder_of(world, FAKE), "--output", tmp_path / "out")
    assert code == 1 and "no model folder" in err and "Repo id" not in err


def test_reals_passed_as_fakes_are_refused(detector_dir, world, tmp_path):
    reals = folder_of(world, REAL)
    code, _, err = cli(detector_dir, "--fakes", reals, "--reals", reals, "--output", tmp_path / "out")
    assert code == 1 and "also given as real images" in err and not (tmp_path / "out").exists()


def test_an_adapter_refuses_another_base_detector_naming_both(adapted, clip_dir, tmp_path):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from mirage_hf.model_folder import export_model

    _, folder = adapted
    torch.manual_seed(1)
    other = from_clip(MiraGeForImageClassification, clip_dir, mode="mirage", prompt_depth=2)
    other_dir = export_model(other, AutoImageProcessor.from_pretrained(clip_dir), tmp_path / "other-detector")
    recorded = json.loads((folder / "config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(ValueError, match="trained on the detector") as error:
        from_adapter(MiraGeForImageClassification, folder, base_model=other_dir)
    assert recorded in str(error.value) and str(other_dir) in str(error.value)

    with pytest.raises(AdaptError, match="is an adapter"):
        adapt(str(folder), [], [])


def test_the_reference_is_the_detectors_own_evaluation_data_regenerated(tmp_path):
    """A detector trained on the generated data names it in eval_results.json with its options; adaptation
    regenerates exactly those images (GenImage layout, the val split of the evaluated generators)."""
    options = {"seed": 3, "n_train_per_class": 5, "n_val_per_class": 4, "image_size": 16}
    run = tmp_path / "run"
    original = make_synthetic_genimage(run / "synthetic-data", generators=["upsampler", "banding"], **options)
    model_dir = run / "model"
    model_dir.mkdir()
    clean = {name: {"accuracy": 0.5} for name in ("upsampler", "banding", "mean", "all")}
    eval_results = {"eval_dataset": "synthetic", "eval_split": "val", "synthetic": options, "clean": clean}
    (model_dir / "eval_results.json").write_text(json.dumps(eval_results))
    rows, name = reference_rows(str(model_dir), None, None, tmp_path / "work")
    assert name == "synthetic [val]" and len(rows) == 16
    regenerated = {row["image"]["path"].split("/")[-1]: open(row["image"]["path"], "rb").read() for row in rows}
    written = {p.name: p.read_bytes() for p in original.glob("*/val/*/*.png")}
    assert regenerated == written

    del eval_results["synthetic"]  # a run from before the record: its options.json beside model/ says the same
    (model_dir / "eval_results.json").write_text(json.dumps(eval_results))
    (run / "synthetic-data" / "options.json").write_text(json.dumps(options))
    assert len(reference_rows(str(model_dir), None, None, tmp_path / "work2")[0]) == 16

    (run / "synthetic-data" / "options.json").unlink()
    with pytest.raises(AdaptError, match="--reference"):
        reference_rows(str(model_dir), None, None, tmp_path / "work3")


# ================================================================================================ shipping


def test_mirage_push_stages_an_adapter_with_its_base_in_the_card(adapted, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from mirage_hf.hub import main as push

    _, folder = adapted
    with pytest.raises(SystemExit, match="publish it first"):
        push(["--model_dir", str(folder), "--repo_id", "you/adapter", "--staging_dir", str(tmp_path / "a"),
              "--license", "cc-by-nc-sa-4.0", "--dry_run"])  # fmt: skip
    push(["--model_dir", str(folder), "--repo_id", "you/adapter", "--space_repo_id", "you/space", "--base_model",
          "you/detector", "--staging_dir", str(tmp_path / "s"), "--license", "cc-by-nc-sa-4.0", "--dry_run"])  # fmt: skip
    staged = tmp_path / "s" / "model"
    assert {p.name for p in staged.iterdir()} == {
        ADAPTER_WEIGHTS_NAME, ADAPT_RESULTS_NAME, "config.json", "preprocessor_config.json", "README.md",
    }  # fmt: skip
    card = ModelCard.load(staged / "README.md")
    assert card.data.base_model == "you/detector" and card.data.base_model_relation == "adapter"
    assert 'pipeline("image-classification", model="you/adapter")' in card.text
    assert json.loads((staged / "config.json").read_text())["base_model_name_or_path"] == "you/detector"
    assert "repo_type='space'" in capsys.readouterr().out
    assert (tmp_path / "s" / "space" / "app.py").is_file()


def test_the_space_names_the_adapter_and_its_base(adapted, monkeypatch):
    pytest.importorskip("gradio")
    from mirage_hf.space import app as space

    _, folder = adapted
    detector = Detector.from_pretrained(folder, device="cpu")
    info = space.DetectorApp(lambda: detector).model_info()[1]
    assert f"`{folder}`" in info and "adapter on the base detector" in info


def test_images_from_a_file_list_and_from_a_labelled_data_set(detector_dir, world, tmp_path):
    listing = tmp_path / "fakes.txt"
    listing.write_text("".join(f"{path}\n" for path in sorted(folder_of(world, FAKE, "val").glob("*.png"))[:5]))
    labelled = tmp_path / "labelled"
    shutil.copytree(folder_of(world, FAKE), labelled / "fake")
    shutil.copytree(folder_of(world, REAL), labelled / "real")
    output = tmp_path / "out"
    code, _, err = cli(
        detector_dir, "--files_from", listing, "--dataset", labelled, "--reference", f"genimage:{world}", "--steps",
        1, "--batch_size", 4, "--output", output, "--force", "-q",
    )  # fmt: skip
    assert code == 0, err
    images = json.loads((output / ADAPT_RESULTS_NAME).read_text())["images"]
    assert (images["fakes"], images["reals"]) == (17, 12)  # 5 listed + 12 of the data set's fakes; its 12 reals


# ------------------------------------------------------------------- the engine: resume, mixed precision, processes


@pytest.mark.parametrize("method", ["anchor", "prompts"])
def test_an_interrupted_adaptation_resumes_to_the_same_weights_and_loss_log(detector_dir, world, tmp_path, monkeypatch,
                                                                           caplog, method):  # fmt: skip
    """Killed after the step-4 checkpoint and resumed with `latest`: bit for bit the weights, loss log and tables of
    an uninterrupted run (the row stream wraps mid-run and the augmentation flips: both are restored)."""
    caplog.set_level("INFO", logger="mirage_hf")
    options = AdaptOptions(steps=6, batch_size=8, holdout=0.25, generator="diffusion", method=method,
                           learning_rate=0.05)  # fmt: skip
    straight = run_adapt(detector_dir, world, options)
    checkpoints = Checkpointing(str(tmp_path / "run"), every=2, frozen_base=frozen_base_fingerprint(str(detector_dir)))
    with killed_after_checkpoint(monkeypatch, step=4):
        run_adapt(detector_dir, world, options, checkpointing=checkpoints)
    resumed = run_adapt(
        detector_dir, world, options, checkpointing=dataclasses.replace(checkpoints, resume_from="latest")
    )
    assert "resumed from step 4" in caplog.text
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step_00000004")
    with safe_open(checkpoint / "model.safetensors", "pt") as handle:  # what trains; the detector stays out
        assert not any(name.startswith("clip.") for name in handle.keys())

    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert resumed.results["loss_log"] == straight.results["loss_log"]
    assert resumed.results["after"] == straight.results["after"]


def test_adaptation_in_bf16_computes_in_bfloat16_and_lands_near_the_fp32_weights(detector_dir, world):
    options = AdaptOptions(steps=6, batch_size=8, holdout=0.25, generator="diffusion", method="prompts",
                           learning_rate=0.05)  # fmt: skip
    detector = MiraGeForImageClassification.from_pretrained(detector_dir)
    base = {name: param.detach() for name, param in detector.named_parameters() if param.requires_grad}
    fp32 = run_adapt(detector_dir, world, options).model.state_dict()
    reset_accelerator_state()  # one precision per process: as a new run of mirage-adapt
    dtypes = []

    def watch(module, args, output):
        if type(module).__name__ == "CLIPMLP" and module.training:
            dtypes.append(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        bf16 = run_adapt(detector_dir, world, dataclasses.replace(options, mixed_precision="bf16")).model.state_dict()
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    trained = [name for name in base if not torch.equal(fp32[name], base[name])]
    assert trained and all(bf16[name].dtype == torch.float32 for name in trained)  # fp32 weights, bf16 compute
    step32 = torch.cat([(fp32[name] - base[name]).flatten() for name in trained])
    step16 = torch.cat([(bf16[name] - base[name]).flatten() for name in trained])
    assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.95
    assert (step16 - step32).norm() < 0.25 * step32.norm()


def test_a_resumed_mirage_adapt_says_where_it_resumed(detector_dir, world, tmp_path, monkeypatch, caplog):
    """mirage-adapt killed after its step-2 checkpoint and run again with --resume_from_checkpoint latest says on
    its command line that it continued from step 2 (the engine's log reaches the command line)."""
    import logging

    logging.getLogger("mirage_hf").setLevel(logging.NOTSET)  # as in a fresh process: no earlier command set it
    argv = [str(a) for a in adapt_argv(detector_dir, world, tmp_path / "adapter", "--steps", 4, "--save_every", 2)]
    argv.remove("-q")
    with killed_after_checkpoint(monkeypatch):
        main(argv)
    assert main([*argv, "--resume_from_checkpoint", "latest", "--force"]) == 0
    assert "resumed from step 2" in caplog.text


RECORDING_ADAPT_PY = """
import json, sys
from accelerate import PartialState
from mirage_hf import adaptation, engine

drawn, draw, train, rates = [], adaptation.Batches.__next__, engine.Engine.train, []

def record(self):
    rows = draw(self)
    drawn.append([row["image"]["path"] for row in rows])
    return rows

def train_and_record_rate(self, *args, **kwargs):
    rates.append(self.scheduler.get_last_lr()[0])
    state = train(self, *args, **kwargs)
    rates.append(self.scheduler.get_last_lr()[0])
    return state

adaptation.Batches.__next__, engine.Engine.train = record, train_and_record_rate
code = adaptation.main(sys.argv[2:])
state = PartialState()
with open(f"{sys.argv[1]}.rank{state.process_index}.json", "w") as out:
    json.dump({"world_size": state.num_processes, "code": code, "drawn": drawn, "rates": rates}, out)
"""


def test_two_process_adaptation_each_process_draws_its_own_batches(detector_dir, world, tmp_path):
    """`accelerate launch --multi_gpu` with 2 CPU processes (gloo): DDP adaptation where each process draws its own
    rows (seed + process index), on the schedule of one process (warm-up from 0, decayed to 0 at the last step,
    though accelerate steps it once per process); one adapter is written, and the checkpoints beside it are
    removed."""
    import subprocess
    import sys

    from test_training import free_port

    script, record, output = tmp_path / "adapt.py", tmp_path / "record", tmp_path / "adapter"
    script.write_text(RECORDING_ADAPT_PY)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), str(record), *map(str, adapt_argv(detector_dir, world, output, "--force", "--save_every", 1, "--steps", 3)),
    ]  # fmt: skip
    root = Path(__file__).resolve().parent.parent  # this checkout's package, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(Path(f"{record}.rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2] and [rank["code"] for rank in ranks] == [0, 0]
    assert len(ranks[0]["drawn"]) == len(ranks[1]["drawn"]) == 3  # --steps 3, one batch per step and process
    assert ranks[0]["drawn"] != ranks[1]["drawn"]
    assert ranks[0]["rates"] == ranks[1]["rates"] == [0.0, 0.0]
    assert (output / ADAPTER_WEIGHTS_NAME).is_file() and not Path(f"{output}.training").exists()
