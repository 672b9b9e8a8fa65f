"""Verdict stability: the degraded copies are scored like any image, and a verdict whose copies fall on both sides
of the threshold is "unsure"."""

import json

import numpy as np
import pytest
from PIL import Image

from mirage_hf.cli import main
from mirage_hf.inference import Detector
from mirage_hf.stability import STABILITY_COPIES, with_copies
from mirage_hf.transforms import corner_crop, degrade


@pytest.fixture(scope="module")
def detector(detector_dir):
    return Detector.from_pretrained(detector_dir, device="cpu", unsure_margin=0.0)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (44, 52, 3), dtype=np.uint8))


def test_corner_crop_keeps_the_bottom_right_of_each_side(image):
    cropped = corner_crop(image, 0.9)
    assert cropped.size == (47, 40)
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[4:, 5:])


def test_a_verdict_whose_copies_straddle_the_threshold_is_unsure(detector, image):
    copies = [degrade(image, kind, value) for kind, value in STABILITY_COPIES]
    assert [np.asarray(c).tobytes() for c in with_copies([image])] == [
        np.asarray(c).tobytes() for c in [image, *copies]
    ]
    p = detector.p_fake([image, *copies])  # the reference: each copy scored as an image of its own
    assert p.max() - p.min() > 1e-4, "the copies must score differently for this test to mean anything"
    (verdict,) = detector([image], stability=True)
    assert verdict.p_fake == pytest.approx(p[0], abs=1e-5) and verdict.spread == pytest.approx(
        p.max() - p.min(), abs=1e-5
    )
    assert detector([image])[0].spread is None  # no copies, no spread

    between = float(np.sort(p)[0] + np.sort(p)[1]) / 2  # one copy below the threshold, the rest above
    assert detector([image], threshold=between)[0].label in ("real", "fake")  # confident without the copies
    assert detector([image], stability=True, threshold=between)[0].label == "unsure"
    assert detector([image], stability=True, threshold=float(p.min()) - 1e-4)[0].label == "fake"  # all above
    assert detector([image], stability=True, threshold=float(p.max()) + 1e-4)[0].label == "real"  # all below


def test_mirage_detect_stability_column_matches_the_detector(capsys, detector, image, detector_dir, tmp_path):
    images = [image, image.rotate(90, expand=True), image.resize((30, 30))]
    for index, img in enumerate(images):
        img.save(tmp_path / f"img-{index}.png")
    code = main(
        [str(tmp_path), "--model", str(detector_dir), "--format", "jsonl", "--stability", "--unsure_margin", "0"]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(rows) == 3
    for row, verdict in zip(rows, detector(images, stability=True)):
        assert (row["label"], row["p_fake"]) == (verdict.label, round(verdict.p_fake, 4))
        assert row["spread"] == pytest.approx(verdict.spread, abs=1e-4)
    main([str(tmp_path), "--model", str(detector_dir), "--format", "jsonl"])
    assert "spread" not in json.loads(capsys.readouterr().out.splitlines()[0])  # a column only with --stability


def test_resume_keeps_the_columns_of_the_output_or_names_the_options(capsys, image, detector_dir, tmp_path):
    for index in range(3):
        image.rotate(90 * index).save(tmp_path / f"img-{index}.png")
    base = [str(tmp_path), "--model", str(detector_dir), "--format", "csv", "--output"]
    assert main([*base, str(tmp_path / "stable.csv"), "--stability"]) == 0
    code = main([*base, str(tmp_path / "stable.csv"), "--resume"])  # without --stability: not mixed in
    err = capsys.readouterr().err
    assert code == 1 and "started with --stability and without --provenance: resume with the same options" in err
    assert main([*base, str(tmp_path / "plain.csv")]) == 0
    assert main([*base, str(tmp_path / "plain.csv"), "--resume", "--stability"]) == 1  # the options it lacked
    assert "started without --stability or --provenance: resume with the same options" in capsys.readouterr().err
    old = tmp_path / "old.csv"  # an output of a version before videos: four columns, one file done
    old.write_text(f"path,label,p_fake,error\n{tmp_path / 'img-0.png'},fake,0.9999,\n")
    assert main([*base, str(old), "--resume"]) == 0
    lines = old.read_text().splitlines()
    assert len(lines) == 4 and all(line.count(",") == 3 for line in lines) and lines[1].endswith(",0.9999,")
