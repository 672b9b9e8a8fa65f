"""ONNX export and the ONNX Runtime backends: the graphs score like PyTorch, and every backend gives the CLI the
same verdicts, unsure band, output formats and per-file errors."""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import scaled_p_fake, with_threshold
from PIL import Image

from mirage_hf import cli, onnx_export
from mirage_hf.inference import Detector, verdict_label
from mirage_hf.onnx_export import export_onnx
from mirage_hf.scan import columns
from mirage_hf.scoring import BACKENDS

SIZES = [(40, 36), (33, 45), (61, 29), (30, 30), (97, 41), (35, 70), (1, 1)]  # (width, height), odd ones
CLOSE = {"torch": 0.0, "onnx": 1e-4, "onnx-int8": 0.02}  # the largest |p(fake) - PyTorch| each backend may have


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def onnx_model_dir(detector_dir, tmp_path_factory):
    """A copy of the test detector, its threshold moved into the middle of its scores, exported by the console
    script's main()."""
    scores = scaled_p_fake(detector_dir, [image.convert("RGB") for image in images() + images(1)])
    model_dir = with_threshold(detector_dir, tmp_path_factory.mktemp("onnx") / "model", float(np.median(scores)))
    assert onnx_export.main([str(model_dir)]) == 0
    return model_dir


def test_export_writes_the_hub_layout_with_a_dynamic_batch_and_no_text_tower(onnx_model_dir):
    folder = onnx_model_dir / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["export_info.json", "model.onnx", "model_quantized.onnx"]
    info = json.loads((folder / "export_info.json").read_text())
    assert info["opset"] == onnx_export.OPSET and info["exporter"].startswith("torch.onnx.export")
    assert {"mirage_hf", "torch", "onnx", "onnxruntime"} <= set(info["versions"])
    assert info["decision_threshold"] == json.loads((onnx_model_dir / "config.json").read_text())["decision_threshold"]
    for name in ("model.onnx", "model_quantized.onnx"):
        graph = onnx.load(folder / name).graph
        (pixel_values,) = graph.input
        dims = pixel_values.type.tensor_type.shape.dim
        assert (
            pixel_values.name == "pixel_values" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 30, 30]
        )
        assert [output.name for output in graph.output] == ["logits", "logit_diff", "p_fake"]
        assert not [init.name for init in graph.initializer if "text" in init.name], "the text tower is exported"


def integer_weights(graph) -> list[str]:
    return [init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]


def test_the_quantized_graph_holds_int8_weights_and_integer_matmuls(onnx_model_dir):
    """The int8 graph is quantized, not a copy of the fp32 one: its matmul weights are int8 initializers, read by
    integer matmuls on dynamically quantized activations; the fp32 graph has neither."""
    fp32, int8 = (onnx.load(onnx_model_dir / "onnx" / name).graph for name in ("model.onnx", "model_quantized.onnx"))
    assert not integer_weights(fp32) and not {node.op_type for node in fp32.node} & {"MatMulInteger"}
    matmuls = sum(node.op_type == "MatMul" for node in fp32.node)
    int8_ops = [node.op_type for node in int8.node]
    assert int8_ops.count("MatMulInteger") >= matmuls // 2 and "DynamicQuantizeLinear" in int8_ops
    assert len(integer_weights(int8)) >= int8_ops.count("MatMulInteger")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_scores_equal_pytorch_on_odd_image_sizes(onnx_model_dir, backend):
    torch_detector = Detector.from_pretrained(onnx_model_dir, device="cpu")
    detector = Detector.from_pretrained(onnx_model_dir, device="cpu", backend=backend)
    assert detector.backend == backend and detector.threshold == torch_detector.threshold
    batch = images()
    reference = torch_detector.p_fake(batch)
    assert np.ptp(reference) > 0.02, "the scores must differ for the comparison to mean anything"
    np.testing.assert_allclose(detector.p_fake(batch), reference, rtol=0, atol=CLOSE[backend])
    np.testing.assert_allclose(detector.p_fake(batch[:1]), reference[:1], rtol=0, atol=CLOSE[backend])  # batch 1
    if backend == "onnx-int8":  # int8 rounding moves the scores a little: it is not the fp32 graph
        fp32_graph = Detector.from_pretrained(onnx_model_dir, device="cpu", backend="onnx").p_fake(batch)
        assert not np.array_equal(detector.p_fake(batch), fp32_graph)

    # The calibrated logits keep the PyTorch model's semantics: softmax >= 0.5 is the decision at the threshold.
    pixel_values = torch_detector.preprocess(batch)
    outputs = detector.model(pixel_values)
    with torch.no_grad():
        torch_logits = torch_detector.model(pixel_values=pixel_values).logits.numpy()
    np.testing.assert_allclose(outputs["logits"], torch_logits, rtol=0, atol=CLOSE[backend] * 200)
    assert ((outputs["logits"][:, 1] > outputs["logits"][:, 0]) == (outputs["p_fake"] >= detector.threshold)).all()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    for index, image in enumerate(images() + images(1)):
        image.save(root / f"ok_{index:02d}.png")
    (root / "bad_text.jpg").write_text("this is not a JPEG")
    (root / "bad_empty.png").write_bytes(b"")
    return root


def scan(capsys, *args):
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_backend_gives_the_cli_the_same_rows(capsys, onnx_model_dir, folder):
    """Same files, order, errors and formats; the same verdicts (unsure included) wherever the score is farther
    from a decision edge than the backend's tolerance. The band is placed so that the nearest score falls inside it."""
    torch_detector = Detector.from_pretrained(onnx_model_dir, device="cpu")
    threshold = torch_detector.threshold
    margin = round(float(np.min(np.abs(torch_detector.p_fake(images() + images(1)) - threshold))) + 0.001, 4)
    runs = {}
    for backend in BACKENDS:
        common = [folder, "--model", onnx_model_dir, "--backend", backend, "--unsure_margin", margin, "-q"]
        code, out, err = scan(capsys, *common, "--format", "json")
        assert code == 2 and err.count("cannot read") == 2
        runs[backend] = json.loads(out)
        code, csv_out, _ = scan(capsys, *common, "--format", "csv")
        header = ",".join(columns())  # path,label,p_fake,error first, then the video columns
        assert csv_out.splitlines()[0] == header and len(csv_out.splitlines()) == len(out.split("{"))
    reference = runs["torch"]
    assert {row["label"] for row in reference} == {"real", "fake", "unsure", "error"}
    for backend, rows in runs.items():
        assert [(r["path"], r["error"]) for r in rows] == [(r["path"], r["error"]) for r in reference]
        compared = set()
        for row, expected in zip(rows, reference):
            if expected["p_fake"] is None:
                assert row["label"] == "error" and row["p_fake"] is None
                continue
            assert abs(row["p_fake"] - expected["p_fake"]) <= CLOSE[backend] + 1e-4  # 4-decimal rounding
            edges = (threshold - margin, threshold, threshold + margin)
            if min(abs(expected["p_fake"] - edge) for edge in edges) > CLOSE[backend] + 1e-4:
                assert row["label"] == expected["label"] == verdict_label(row["p_fake"], threshold, margin)
                compared.add(row["label"])
        assert compared >= ({"real", "fake", "unsure"} if backend != "onnx-int8" else {"real", "fake"})


def test_explain_and_compile_need_the_torch_backend(capsys, onnx_model_dir, folder, tmp_path):
    code, _, err = scan(capsys, folder, "--model", onnx_model_dir, "--backend", "onnx", "--explain", tmp_path / "m")
    assert code == 1 and "explain needs the PyTorch model" in err and "use the torch backend" in err
    assert not (tmp_path / "m").exists()
    code, _, err = scan(capsys, folder, "--model", onnx_model_dir, "--backend", "onnx-int8", "--compile")
    assert code == 1 and "compile needs the PyTorch model" in err


def test_missing_or_stale_export_and_missing_dependencies_are_clear(
    capsys, detector_dir, onnx_model_dir, folder, tmp_path, monkeypatch
):
    code, _, err = scan(capsys, folder, "--model", detector_dir, "--backend", "onnx")
    assert code == 1 and "no onnx/model.onnx" in err and "mirage-export-onnx" in err

    stale = tmp_path / "stale"
    shutil.copytree(onnx_model_dir, stale)
    config = json.loads((stale / "config.json").read_text())
    config["decision_threshold"] = 0.9
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="export again with mirage-export-onnx"):
        Detector.from_pretrained(stale, backend="onnx-int8")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [onnx] extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'mirage-hf\[onnx\]'"):
        Detector.from_pretrained(onnx_model_dir, backend="onnx")
    assert onnx_export.main([str(stale)]) == 1
    assert "pip install 'mirage-hf[onnx]'" in capsys.readouterr().err
    assert json.loads((stale / "onnx" / "export_info.json").read_text())["decision_threshold"] != 0.9  # untouched


def test_an_fp32_graph_that_differs_from_pytorch_is_refused_and_the_old_export_kept(
    onnx_model_dir, tmp_path, monkeypatch
):
    """The export measures its fp32 graph against PyTorch and refuses one beyond FP32_TOLERANCE (here every graph:
    the tolerance is set below zero), leaving the earlier export in place."""
    model_dir = tmp_path / "model"
    shutil.copytree(onnx_model_dir, model_dir)
    before = (model_dir / "onnx" / "export_info.json").read_text()
    recorded = json.loads(before)["max_abs_p_fake_difference_from_pytorch_on_random_pixels"]
    assert recorded["onnx"] <= onnx_export.FP32_TOLERANCE  # what the export measured and accepted
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match=r"fp32 graph differs from PyTorch by .* not written"):
        export_onnx(model_dir, quantize=False)
    assert (model_dir / "onnx" / "export_info.json").read_text() == before


def test_reexport_replaces_the_folder_whole(onnx_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(onnx_model_dir, model_dir)
    (model_dir / "onnx" / "leftover.onnx").write_bytes(b"old")
    folder = export_onnx(model_dir, quantize=False)
    assert sorted(p.name for p in folder.iterdir()) == ["export_info.json", "model.onnx"]
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == []


def test_mirage_eval_scores_the_exported_graphs_on_the_same_data(onnx_model_dir, tmp_path, capsys):
    """`mirage-eval --backend onnx|onnx-int8` gives the table of the graph a deployment runs."""
    from mirage_hf.demo.synthetic import make_synthetic_genimage
    from mirage_hf.evaluate_model import main
    from mirage_hf.training import main as train

    make_synthetic_genimage(tmp_path / "data", generators=["upsampler"], n_train_per_class=1, n_val_per_class=12,
                            image_size=48)  # fmt: skip
    results = {
        backend: main(
            [
                "--model",
                str(onnx_model_dir),
                "--backend",
                backend,
                "--dataset",
                f"genimage:{tmp_path / 'data'}",
                "--output_dir",
                str(tmp_path / backend),
                "--num_workers",
                "0",
            ]
        )  # fmt: skip
        for backend in BACKENDS
    }
    assert [results[b]["backend"] for b in BACKENDS] == list(BACKENDS)
    assert json.loads((tmp_path / "onnx-int8" / "eval_results.json").read_text())["backend"] == "onnx-int8"
    torch_all = results["torch"]["clean"]["all"]
    assert torch_all["n"] == 24 and results["onnx"]["clean"]["all"] == pytest.approx(torch_all, abs=1e-4)
    assert results["onnx-int8"]["clean"]["all"]["n"] == 24
    with pytest.raises(SystemExit) as refused:  # training has no backend: it trains the PyTorch model
        train(["--backend", "onnx"])
    assert refused.value.code == 2 and "unrecognized arguments: --backend onnx" in capsys.readouterr().err
