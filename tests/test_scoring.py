"""One scorer interface over the backends (PyTorch, ONNX Runtime) for `Detector` and evaluation, and one place
that says what a backend cannot do."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from mirage_hf import cli
from mirage_hf.evaluation import predict
from mirage_hf.inference import Detector
from mirage_hf.lora import add_lora
from mirage_hf.scoring import SCORE_FIELDS, TorchScorer, check_backend_options, load_scorer
from mirage_hf.train_config import EvalConfig, parse_args
from mirage_hf.transforms import Preprocessor


@pytest.mark.parametrize(
    ("options", "flags", "message"),
    [
        ({"compile": True}, ["--compile"], "compile needs the PyTorch model"),
        ({"dtype": torch.bfloat16}, ["--dtype", "bfloat16"], "the onnx-int8 backend computes in the exported graph"),
        ({"explain": True}, ["--explain", "maps"], "explain needs the PyTorch model"),
    ],
)
def test_every_entry_point_refuses_what_an_onnx_backend_cannot_do_with_one_message(
    detector_dir, options, flags, message, capsys, tmp_path
):
    """The rule lives in `check_backend_options`; the Python API, mirage-detect and train.py all say it the same
    way, before any model is loaded."""
    with pytest.raises(ValueError, match=message) as caught:
        check_backend_options("onnx-int8", **options)
    expected = str(caught.value)
    if "explain" not in options:
        for load in (load_scorer, Detector.from_pretrained):
            with pytest.raises(ValueError) as caught:
                load(detector_dir, backend="onnx-int8", **options)
            assert str(caught.value) == expected
    assert cli.main([str(tmp_path), "--model", str(detector_dir), "--backend", "onnx-int8", *flags]) == 1
    assert capsys.readouterr().err.strip().endswith(f"--backend onnx-int8: {expected}")
    if "compile" in options:
        with pytest.raises(ValueError) as caught:
            parse_args(["--model", str(detector_dir), "--backend", "onnx-int8", "--compile"], EvalConfig)
        assert str(caught.value) == expected


def test_evaluation_and_the_detector_score_a_model_in_training_through_the_same_scorer(make_model, clip_dir):
    """Evaluation in the middle of LoRA training scores the MiraGe model inside the PEFT wrapper in eval mode, as
    `Detector` does, and leaves it training."""
    model = add_lora(make_model("mirage"), r=2, alpha=4, towers=("vision",), projections=("q_proj",)).train()
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (34, 40, 3), dtype=np.uint8)) for _ in range(5)]
    rows = [{"image": image, "label": index % 2} for index, image in enumerate(images)]
    scored = predict(model, rows, Preprocessor(processor), Accelerator(cpu=True), batch_size=2)
    diffs, p_fake = scored.logit_diff, scored.p_fake
    assert model.training and model.get_base_model().training
    scorer = TorchScorer(model)
    outputs = scorer(Preprocessor(processor)(images))
    assert set(outputs) == set(SCORE_FIELDS) and model.training
    detector = Detector(scorer, processor)
    np.testing.assert_allclose(detector.p_fake(images), p_fake, rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs["logit_diff"], diffs, rtol=0, atol=1e-5)
    model.eval()
    with torch.no_grad():
        reference = model(pixel_values=Preprocessor(processor)(images)).p_fake.numpy()
    np.testing.assert_allclose(p_fake, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("margin", [-0.1, 0.5, 0.7])
def test_the_unsure_band_s_range_is_checked_in_one_place(detector_dir, margin, capsys, tmp_path):
    """`Detector` and `mirage-detect --unsure_margin` refuse the same margins with the same words."""
    with pytest.raises(ValueError) as caught:
        Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=margin)
    assert "unsure_margin must lie in [0, 0.5)" in str(caught.value)
    assert cli.main([str(tmp_path), "--model", str(detector_dir), "--unsure_margin", str(margin)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"argument --unsure_margin: {caught.value}")
