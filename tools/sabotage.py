"""Breaks each feature that a test claims, one feature at a time, in a temporary copy of the repository, and runs the
tests that claim it: every one of them must fail. A test that stays green while its feature is broken proves
nothing (issue 20).

    python tools/sabotage.py              # every sabotage; writes docs/sabotage.md
    python tools/sabotage.py -k calib     # the sabotages whose name contains "calib" (prints only; repeatable)
    python tools/sabotage.py --list

A sabotage is a small text patch of one file (the text as it is, the text it becomes), or a change of the tests'
environment. The unbroken copy runs every claimed test first (the baseline: they must pass, or skip where the
machine lacks what they need). A patch whose text is no longer in its file is reported as "patch did not apply",
never as a pass: update the patch with the code. The exit status is 0 only when every sabotage was caught.

Add a sabotage with every test you add: break the feature the test is named for, watch the test fail, and list the
patch below. The tests run with this interpreter, in the copy (its `mirage_hf` comes first on the path); tests that
start Python processes with an environment of their own import the installed package, so claim none of those here.
"""

import argparse
import configparser
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "sabotage.md"
TEST_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Sabotage:
    name: str
    breaks: str  # what a user would lose, in a few words
    tests: tuple[str, ...]  # the pytest node ids that claim the feature: each must fail
    path: str | None = None  # the file patched, relative to the repository root (None: only `env` changes)
    old: str = ""
    new: str = ""
    env: dict = field(default_factory=dict)  # what the tests' environment gets (a callable value gets the copy)


MODELING = "mirage_hf/modeling_mirage.py"
SABOTAGES = [
    Sabotage(
        "uncalibrated-logits",
        "forward returns the raw logits: temperature and threshold ignored",
        (
            "tests/test_modeling.py::test_calibration_moves_the_decision",
            "tests/test_modeling.py::test_output_carries_the_raw_logit_difference_and_the_calibrated_p_fake[mirage]",
            "tests/test_inference.py::test_detector_agrees_with_the_pipeline_decision",
        ),
        MODELING,
        "    calibrated = logits if temperature == 1.0 and threshold == 0.5 else logits / temperature - shift\n",
        "    calibrated = logits\n",
    ),
    Sabotage(
        "two-scores",
        "p(fake) leaves the threshold out, so it differs from pipeline()'s fake score and verdict",
        (
            "tests/test_parity.py::test_every_surface_reports_one_score_and_one_verdict[resize]",
            "tests/test_calibration.py::test_calibrate_logits_is_the_rule_exactly",
        ),
        MODELING,
        "    p_fake = torch.sigmoid(calibrated[..., 1] - calibrated[..., 0])\n",
        "    p_fake = torch.sigmoid(logit_diff / temperature)\n",
    ),
    Sabotage(
        "guard-reads-overall-accuracy",
        "mirage-adapt's guard misses a loss in one class hidden behind a gain in the other",
        (
            "tests/test_adapt.py::test_the_guard_refuses_forgetting_hidden_in_one_class_and_force_writes_it_with_a_note"
            "[fake_accuracy]",
        ),
        "mirage_hf/adaptation.py",
        'GUARDED = {"real_accuracy": "real accuracy", "fake_accuracy": "fake accuracy"}\n',
        'GUARDED = {"accuracy": "accuracy"}\n',
    ),
    Sabotage(
        "one-fake-adapts",
        "mirage-adapt trains on one fake with none held out, without a word",
        ("tests/test_adapt.py::test_too_few_fakes_are_refused_saying_how_many_are_needed",),
        "mirage_hf/adaptation.py",
        "    if shortfall and not force:\n",
        "    if False:\n",
    ),
    Sabotage(
        "added-anchor-ignored",
        "an anchor added for a new generator never reaches the fake class (mirage-adapt's default learns nothing)",
        (
            "tests/test_modeling.py::test_added_fake_anchors_make_p_fake_one_minus_p_real_over_every_anchor",
            "tests/test_adapt.py::test_an_added_anchor_catches_new_fakes_the_base_calls_real_and_only_raises_p_fake",
        ),
        MODELING,
        "        fake = torch.logsumexp(torch.cat([logits[:, 1:], added.to(logits.dtype)], 1), 1)\n",
        "        fake = logits[:, 1] + 0 * added.sum(1)\n",
    ),
    Sabotage(
        "ray-resume-rescans",
        "mirage-detect --engine ray --resume scores every file again (duplicate rows in the Parquet output)",
        ("tests/test_ray.py::test_resume_after_an_interrupted_job_scores_only_what_is_missing",),
        "mirage_hf/cli.py",
        "    done = done_paths(ray_scan.parquet_rows(args.output)) if args.resume else set()\n",
        "    done = set()\n",
    ),
    Sabotage(
        "ray-repeats-inputs",
        "mirage-detect --engine ray scores a file named twice twice",
        ("tests/test_ray.py::test_the_ray_scan_writes_the_local_scan_s_rows",),
        "mirage_hf/ray_scan.py",
        "    return find_images(expanded, files_from, on_empty_folder)\n",
        "    return PathList(expanded)\n",
    ),
    Sabotage(
        "int8-graph-is-fp32",
        "the quantized ONNX graph is a copy of the fp32 one",
        (
            "tests/test_onnx.py::test_the_quantized_graph_holds_int8_weights_and_integer_matmuls",
            "tests/test_onnx.py::test_onnx_scores_equal_pytorch_on_odd_image_sizes[onnx-int8]",
        ),
        "mirage_hf/onnx_export.py",
        "    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)\n",
        "    __import__('shutil').copyfile(source, target)\n",
    ),
    Sabotage(
        "no-mixed-precision",
        "training ignores --mixed_precision bf16 (the Accelerator gets 'no')",
        ("tests/test_training.py::test_ufd_layout_in_bf16",),
        "mirage_hf/training.py",
        "    accelerator = make_accelerator(\n        mixed_precision=cfg.mixed_precision,\n",
        '    accelerator = make_accelerator(\n        mixed_precision="no",\n',
    ),
    Sabotage(
        "checkpointing-does-nothing",
        "activation_checkpointing_enable() leaves every activation stored",
        ("tests/test_modeling.py::test_activation_checkpointing_gives_the_same_loss_and_gradients",),
        MODELING,
        "        activation_checkpointing_enable = PreTrainedModel.gradient_checkpointing_enable\n",
        "        activation_checkpointing_enable = PreTrainedModel.gradient_checkpointing_enable\n"
        "    def activation_checkpointing_enable(self, *args, **kwargs):\n        return None\n",
    ),
    Sabotage(
        "nothing-compiled",
        "--compile / compile=True runs the eager model",
        ("tests/test_inference.py::test_compiled_path_matches_the_plain_path",),
        "mirage_hf/scoring.py",
        "    model.encode_image = torch.compile(model.encode_image, dynamic=True)\n",
        "",
    ),
    Sabotage(
        "ladder-one-mode",
        "every rung of the ablation ladder trains the preset's mode",
        ("tests/test_training.py::test_the_ablation_ladder_trains_every_rung_on_each_seed_and_prints_mean_and_spread",),
        "mirage_hf/ladder.py",
        '                        "--mode",\n                        mode,\n',
        "",
    ),
    Sabotage(
        "mirage-loss-is-ce",
        "mirage mode trains with cross-entropy alone, like maple",
        (
            "tests/test_training.py::test_the_ablation_ladder_trains_every_rung_on_each_seed_and_prints_mean_and_spread",
            "tests/test_modeling.py::test_each_rung_has_the_contracted_outputs[mirage]",
        ),
        MODELING,
        '        full = config.mode == "mirage"\n',
        "        full = False\n",
    ),
    Sabotage(
        "space-serves-every-file",
        "the Space serves any file on the machine",
        ("tests/test_reliability.py::test_files_outside_the_allowed_paths_are_not_served",),
        "space/app.py",
        "    app = DetectorApp(detector_factory)\n",
        '    app = DetectorApp(detector_factory)\n    gr.set_static_paths(["/"])\n',
    ),
    Sabotage(
        "file-route-serves-nothing",
        "the route the path test probes serves nothing (as after a Gradio upgrade moves it)",
        ("tests/test_reliability.py::test_files_outside_the_allowed_paths_are_not_served",),
        "tests/test_reliability.py",
        'FILE_ROUTE = "/gradio_api/file="',
        'FILE_ROUTE = "/gradio_api/no-such-route="',
    ),
    Sabotage(
        "ci-without-chromium",
        "CI meant to install chromium (MIRAGE_REQUIRE_CHROMIUM=1) and it is not on PATH",
        ("tests/test_space.py::test_page_in_headless_chromium",),
        env={"MIRAGE_REQUIRE_CHROMIUM": "1", "PATH": lambda copy: str(Path(sys.executable).parent)},
    ),
    Sabotage(
        "prompts-initialised-large",
        "the prompts a CLIP checkpoint lacks start 1000x too large",
        ("tests/test_loading.py::test_from_pretrained_leaves_prompts_finite_and_small",),
        MODELING,
        "                init.normal_(prompt, std=0.02)\n",
        "                init.normal_(prompt, std=20.0)\n",
    ),
    # The guarantees the README and BENCHMARKS.md state, through the tests they name.
    Sabotage(
        "fp32-export-unchecked",
        "an fp32 ONNX graph that differs from PyTorch is written anyway",
        ("tests/test_onnx.py::test_an_fp32_graph_that_differs_from_pytorch_is_refused_and_the_old_export_kept",),
        "mirage_hf/onnx_export.py",
        '    if differences["onnx"] > FP32_TOLERANCE:\n',
        "    if False:\n",
    ),
    Sabotage(
        "ranking-on-p-fake",
        "AP, ROC AUC and TPR@5%FPR rank by the calibrated p(fake), which saturates",
        ("tests/test_calibration.py::test_ranking_metrics_equal_sklearn_on_the_logit_difference_at_any_temperature",),
        "mirage_hf/evaluation.py",
        "threshold=FAKE_FROM, scores=scored.logit_diff\n",
        "threshold=FAKE_FROM, scores=scored.p_fake\n",
    ),
    Sabotage(
        "resume-rescans-everything",
        "mirage-detect --resume scores every file again (duplicate rows)",
        (
            "tests/test_cli.py::test_resume_of_a_csv_with_a_cut_last_line_scores_only_the_rest",
            "tests/test_cli.py::test_a_scan_killed_with_sigkill_resumes_to_one_row_per_file_with_the_uninterrupted_scores",
        ),
        "mirage_hf/cli.py",
        "    todo = PathList(path for path in paths if path not in done) if done else paths\n",
        "    todo = paths\n",
    ),
    Sabotage(
        "cut-last-line-kept",
        "--resume keeps the half row a kill left at the end of the output",
        ("tests/test_cli.py::test_resume_of_a_csv_with_a_cut_last_line_scores_only_the_rest",),
        "mirage_hf/scan.py",
        "    if repair_tail(path):\n",
        "    if False:\n",
    ),
    Sabotage(
        "adapt-resume-redraws-rows",
        "a resumed mirage-adapt draws its rows afresh instead of where the checkpoint stood",
        (
            "tests/test_adapt.py::test_an_interrupted_adaptation_resumes_to_the_same_weights_and_loss_log[prompts]",
            "tests/test_adapt.py::test_an_interrupted_adaptation_resumes_to_the_same_weights_and_loss_log[anchor]",
        ),
        "mirage_hf/adaptation.py",
        '        parts = {"batches": batches, "augmentation": preprocess.augmentation, "loss_log": log}\n',
        '        parts = {"augmentation": preprocess.augmentation, "loss_log": log}\n',
    ),
    Sabotage(
        "adapt-ignores-mixed-precision",
        "mirage-adapt ignores --mixed_precision bf16",
        ("tests/test_adapt.py::test_adaptation_in_bf16_computes_in_bfloat16_and_lands_near_the_fp32_weights",),
        "mirage_hf/adaptation.py",
        "mixed_precision=options.mixed_precision)",
        'mixed_precision="no")',
    ),
    Sabotage(
        "resume-restarts-the-epoch",
        "--resume_from_checkpoint replays the epoch's batches from its start",
        ("tests/test_training.py::test_interrupted_training_resumes_to_the_same_parameters",),
        "mirage_hf/training.py",
        "        loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)\n",
        "        pass\n",
    ),
    Sabotage(
        "video-frames-through-pyav-cache",
        "a scan's decode workers hang once their process has converted a video frame itself (PyAV >= 18.1.1)",
        ("tests/test_video.py::test_forked_decode_workers_do_not_hang_after_the_parent_decoded_a_video",),
        "mirage_hf/video.py",
        "frames.append(_rgb_image(frame, converter))",
        "frames.append(frame.to_image())",
    ),
]


def copy_repository(target: Path) -> None:
    """The tracked files and the untracked ones git does not ignore (what a commit would hold), into `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(copy: Path, tests, env_changes: dict) -> tuple[dict[str, str], str]:
    """Runs `tests` in `copy`; returns ({node id: "passed" or "failed/error/skipped: why"}, the tail of the output)."""
    report = copy / ".sabotage-junit.xml"
    report.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(copy)}
    env.update({key: value(copy) if callable(value) else value for key, value in env_changes.items()})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {TEST_TIMEOUT_S} s"
    outcomes = {}
    if report.exists():
        for case in ElementTree.parse(report).iter("testcase"):
            node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
            outcomes[node] = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    kind = {"failure": "failed"}.get(child.tag, child.tag)
                    outcomes[node] = f"{kind}: {first_line(child.get('message', ''))}"
                    break
    return outcomes, output[-3000:]


def first_line(message: str, limit: int = 110) -> str:
    """Why a test failed, in one short line for the table."""
    line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def mapped_packages(copy: Path) -> dict[str, str]:
    """setup.cfg's `package_dir` mapping ({"mirage_hf.space": "space"}): packages that live outside mirage_hf/."""
    parser = configparser.ConfigParser()
    parser.read(copy / "setup.cfg")
    lines = parser.get("options", "package_dir", fallback="").splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


def lay_out_like_the_install(copy: Path) -> None:
    """Links each mapped package into place (mirage_hf/space -> space), as the installed wheel has it, so that the
    copy's own file is imported, not the editable install's."""
    for package, folder in mapped_packages(copy).items():
        link = copy.joinpath(*package.split("."))
        if not link.exists():
            link.symlink_to(copy / folder, target_is_directory=True)


def check_imports_the_copy(copy: Path) -> None:
    """Stops unless the tests would import the copy's packages (not an installed or editable one elsewhere)."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    for package in ("mirage_hf", *mapped_packages(copy)):
        found = subprocess.run(
            [sys.executable, "-c", f"import {package} as p; print(p.__file__)"],
            cwd=copy, env=env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        if not os.path.abspath(found).startswith(str(copy)):
            sys.exit(f"sabotage: the tests would import {found}, not the copy's {package}")


def sabotage_copy(copy: Path, sabotage: Sabotage) -> str | None:
    """Applies the patch; returns the file's original text (None when there is no patch). Raises LookupError
    unless the old text occurs exactly once."""
    if sabotage.path is None:
        return None
    target = copy / sabotage.path
    original = target.read_text() if target.exists() else ""
    if original.count(sabotage.old) != 1 or not sabotage.old:
        raise LookupError(f"{sabotage.path}: the text to replace occurs {original.count(sabotage.old)} times")
    target.write_text(original.replace(sabotage.old, sabotage.new))
    return original


def verdict(outcomes: dict[str, str], tests) -> tuple[str, list[tuple[str, str]]]:
    """("caught" | "SURVIVED" | "tests did not run", rows of (test, outcome)). Caught: every claimed test failed
    (a skip is no failure: a test that skips while its feature is broken proves nothing either)."""
    rows = [(test, outcomes.get(test, "not run")) for test in tests]
    if any(outcome == "not run" for _, outcome in rows):
        return "tests did not run", rows
    if all(outcome.startswith(("failed", "error")) for _, outcome in rows):
        return "caught", rows
    return "SURVIVED", rows


def write_report(lines: list[str], command: str, started: float, failures: int) -> None:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    head = [
        "# Sabotage run: does each test fail when its feature is broken?",
        "",
        "Written by `tools/sabotage.py` (see CONTRIBUTING.md). Each row is one named sabotage (a small patch, listed in",
        "the script) applied alone to a temporary copy of the repository, and a test that claims the feature; the",
        "sabotage is caught when every test that claims it fails.",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{command}`",
        f"- Code: `{commit}`; Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
        f"- Wall time: {time.monotonic() - started:.0f} s",
        "- Baseline (no sabotage): every claimed test passed (or skipped where the machine lacks what it needs)",
        f"- Result: {'every sabotage caught' if failures == 0 else f'{failures} sabotage(s) not caught'}",
        "",
        "| sabotage | what it breaks | patched | test | result | sabotage caught |",
        "|---|---|---|---|---|---|",
    ]
    REPORT.write_text("\n".join(head + lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k", dest="keywords", action="append", help="only the sabotages whose name contains this (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the sabotages and the tests that claim them")
    args = parser.parse_args(argv)
    chosen = [s for s in SABOTAGES if args.keywords is None or any(word in s.name for word in args.keywords)]
    if args.list or not chosen:
        for sabotage in SABOTAGES:
            print(f"{sabotage.name}: {sabotage.breaks}\n    " + "\n    ".join(sabotage.tests))
        return 0 if chosen else 1
    started, command = time.monotonic(), " ".join(["python tools/sabotage.py", *(argv or sys.argv[1:])])
    claimed = list(dict.fromkeys(test for sabotage in chosen for test in sabotage.tests))
    lines, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="mirage-sabotage-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        lay_out_like_the_install(copy)
        check_imports_the_copy(copy)
        baseline, output = run_tests(copy, claimed, {})
        broken = {test: outcome for test, outcome in baseline.items() if not outcome.startswith(("passed", "skipped"))}
        missing = [test for test in claimed if test not in baseline]
        print(f"baseline: {len(baseline)} claimed tests, {sum(o == 'passed' for o in baseline.values())} passed")
        if broken or missing:
            print(output, f"\nbaseline failed: {broken or ''} {missing or ''}", file=sys.stderr)
            return 2
        for sabotage in chosen:
            try:
                original = sabotage_copy(copy, sabotage)
            except LookupError as error:
                status, rows = "patch did not apply", [(test, str(error)) for test in sabotage.tests]
            else:
                try:
                    outcomes, output = run_tests(copy, sabotage.tests, sabotage.env)
                finally:
                    if original is not None:
                        (copy / sabotage.path).write_text(original)
                status, rows = verdict(outcomes, sabotage.tests)
            failures += status != "caught"
            for test, outcome in rows:
                print(f"{status:8s} {sabotage.name:28s} {test}\n         {outcome}")
                cell = outcome.replace("|", "\\|").replace("`", "'")
                where = f"`{sabotage.path}`" if sabotage.path else "environment: " + ", ".join(sabotage.env)
                lines.append(f"| {sabotage.name} | {sabotage.breaks} | {where} | `{test}` | {cell} | {status} |")
            if status != "caught" and status != "patch did not apply":
                print(output, file=sys.stderr)
    print(f"{len(chosen) - failures} of {len(chosen)} sabotages caught")
    if args.keywords is None:
        write_report(lines, command, started, failures)
        print(f"wrote {REPORT.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
