"""The Hub file holds the model; what needs the package is a function of the package, and importing it changes
no model class; adapter folders have a config type of their own; the package's modules import each other without a
circle."""

import ast
import configparser
import importlib.metadata
import inspect
import pickle
import re
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

import mirage_hf
from mirage_hf import MiraGeAdapterConfig, MiraGeForImageClassification, MiraGeModel, modeling_mirage
from mirage_hf.adapter_files import detector_fingerprint, save_detector_adapter
from mirage_hf.building import ADDED_TO_CLIP

PACKAGE = Path(mirage_hf.__file__).parent
PACKAGE_FUNCTIONS = ("from_clip", "save_adapter", "from_adapter")


def test_the_remote_code_saved_with_a_model_holds_the_model_only(make_model, tmp_path):
    """Building on a CLIP checkpoint (tokenizer, its checks, the load-report machinery) is the package's: a user
    who only scores downloads and runs none of it."""
    make_model("mirage").save_pretrained(tmp_path)
    tree = ast.parse((tmp_path / "modeling_mirage.py").read_text())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names
    }
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert not imported & {"AutoTokenizer", "contextvars", "CLIPConfig", "PreTrainedConfig"}
    assert not defined & {"clip_config_dict", "init_context_from_words", *PACKAGE_FUNCTIONS}
    assert not {name for name in defined if "tokeni" in name}


def test_importing_the_package_leaves_the_model_classes_as_the_model_file_defines_them():
    """No method is attached at import: every attribute of the model classes is defined in modeling_mirage.py, so
    the `from_pretrained` that runs is the one a reader finds there (or transformers'); the package's functions are
    plain functions of `mirage_hf`."""
    for cls in (MiraGeModel, MiraGeForImageClassification):
        for name, value in vars(cls).items():
            function = getattr(inspect.unwrap(getattr(value, "__func__", value)), "__code__", None)
            assert function is None or function.co_filename == modeling_mirage.__file__, (cls.__name__, name)
        assert not any(name in vars(cls) for name in PACKAGE_FUNCTIONS)
    assert all(inspect.isfunction(getattr(mirage_hf, name)) for name in PACKAGE_FUNCTIONS)


def test_an_adapter_folder_resolves_through_the_auto_classes_to_its_own_config_and_loader(make_model, tmp_path):
    """`mirage-adapt`'s folder says what it is in config.json: AutoConfig gives the adapter config (base, adapted
    detector config), and the Auto model classes give the base detector with the adapter applied."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from mirage_hf.model_folder import export_model

    model = make_model("mirage")
    detector = export_model(model, AutoImageProcessor.from_pretrained(model.config.clip_name_or_path), tmp_path / "d")
    model.config.decision_threshold = 0.3  # the adapted calibration
    save_detector_adapter(model, detector_fingerprint(detector), tmp_path / "adapter")
    config = AutoConfig.from_pretrained(tmp_path / "adapter")
    assert type(config) is MiraGeAdapterConfig and config.base_model_name_or_path == str(detector)
    assert config.detector_config.decision_threshold == 0.3
    for auto, cls in ((AutoModelForImageClassification, MiraGeForImageClassification), (AutoModel, MiraGeModel)):
        loaded = auto.from_pretrained(tmp_path / "adapter")
        assert type(loaded) is cls and loaded.config.decision_threshold == 0.3
        assert loaded.mirage_adapter["base_model"] == str(detector)
    assert type(AutoConfig.from_pretrained(detector)) is mirage_hf.MiraGeConfig


@pytest.mark.missing_weights_expected
def test_from_clip_gives_the_class_itself_and_leaves_load_reports_of_others_alone(make_model, tmp_path, load_reports):
    """`from_clip` loads through a subclass that expects the new weights to be missing; the model it returns is
    a plain `MiraGeForImageClassification` (it pickles), and loading a MiraGe checkpoint that lacks its prompts
    afterwards still reports them."""
    model = make_model("mirage")
    assert type(model) is MiraGeForImageClassification
    assert not set(ADDED_TO_CLIP) & set(model._keys_to_ignore_on_load_missing)
    assert type(pickle.loads(pickle.dumps(model))) is MiraGeForImageClassification
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("prompt_learner.")}, tmp_path / "model.safetensors")
    MiraGeForImageClassification.from_pretrained(tmp_path)
    (report,) = load_reports
    assert "MISSING" in report and "prompt_learner" in report


def module_imports(path: Path) -> set[str]:
    """The mirage_hf modules `path` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mirage_hf."):
            names.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in names} - {path.stem}


def test_the_package_imports_without_a_circle():
    """`inference` and `onnx_export` used to import each other (one of them inside a function)."""
    graph = {path.stem: module_imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    graph = {name: {dep for dep in deps if dep in graph} for name, deps in graph.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError(f"import circle: {' -> '.join([*path[path.index(name) :], name])}")
        if name in done:
            return
        path.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def string_constants(tree: ast.AST) -> list[str]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


SOURCES = [*PACKAGE.glob("*.py"), PACKAGE.parent / "space" / "app.py"]


def test_each_fact_has_one_home():
    """The label set, the results file's name, the shard marker, the version and the robustness sweep are each
    written once; everything else refers to that place."""
    trees = {path: ast.parse(path.read_text()) for path in SOURCES}
    for literal in ("eval_results.json", "eval_results_{backend}.json", ".done"):
        homes = [path.name for path, tree in trees.items() if literal in string_constants(tree)]
        assert len(homes) == 1, (literal, homes)

    def spells_label_set(node) -> bool:
        values = node.values if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        return values is not None and [getattr(value, "value", None) for value in values] == ["real", "fake"]

    homes = [path.name for path, tree in trees.items() if any(map(spells_label_set, ast.walk(tree)))]
    assert homes == ["configuration_mirage.py"]

    setup = configparser.ConfigParser()
    setup.read(PACKAGE.parent / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: mirage_hf.__version__"

    from mirage_hf.train_config import build_parser
    from mirage_hf.transforms import ROBUSTNESS_SWEEP

    sweep_help = next(action.help for action in build_parser()._actions if action.dest == "robustness")
    for kind, values in ROBUSTNESS_SWEEP.items():
        assert f"{kind} {', '.join(f'{value:g}' for value in values)}" in sweep_help


def test_what_the_package_imports_is_declared_and_evaluate_is_optional():
    """Every third-party module imported at the top of a package module is an install requirement; `evaluate`,
    which only `load_detection_metric` uses, is optional (in [dev])."""
    setup = configparser.ConfigParser()
    setup.read(PACKAGE.parent / "setup.cfg")
    requirement = lambda line: re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    required = {requirement(line) for line in setup["options"]["install_requires"].split("\n") if line.strip()}
    dev = {requirement(line) for line in setup["options.extras_require"]["dev"].split("\n") if line.strip()}
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: a deferred import is optional
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mirage_hf", "__future__"}
    declared = {name: {d.lower().replace("_", "-") for d in distributions.get(name, [name])} for name in third_party}
    assert {name for name, dists in declared.items() if not dists & required} == set()
    assert "scipy" in required and "evaluate" not in required and "evaluate" in dev
