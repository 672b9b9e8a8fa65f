"""`train.py` options: typed parsing from the dataclasses, presets as defaults, the model options from MiraGeConfig."""

import configparser
import dataclasses
from pathlib import Path

import pytest

from mirage_hf.configuration_mirage import MiraGeConfig
from mirage_hf.train_config import NOT_OPTIONS, EvalConfig, ModelOptions, TrainConfig, build_parser, parse_args


def test_mixed_precision_no_is_the_word_no():
    assert parse_args(["--config", "genimage_sd14", "--mixed_precision", "no"]).mixed_precision == "no"


def test_none_switches_an_optional_option_off():
    cfg = parse_args(["--calibrate", "None", "--ctx_init", "None", "--max_steps", "None", "--train_subsets", "None"])
    assert cfg.calibrate is None and cfg.ctx_init is None and cfg.max_steps is None and cfg.train_subsets is None
    assert parse_args(["--calibrate", "null"]).calibrate is None  # YAML's spelling too


def test_one_list_element_is_a_one_element_list():
    assert parse_args(["--train_subsets", "stable_diffusion_v_1_4"]).train_subsets == ["stable_diffusion_v_1_4"]
    assert parse_args(["--train_subsets", "a", "b", "--log_with", "tensorboard"]).train_subsets == ["a", "b"]
    assert TrainConfig(train_subsets="stable_diffusion_v_1_4").train_subsets == ["stable_diffusion_v_1_4"]


def test_mappings_numbers_and_bools_parse_to_their_types():
    cfg = parse_args([
        "--tiny_clip", "{image_size: 16, num_layers: 2}", "--learning_rate", "1e-3", "--ce_weight", "2",
        "--robustness", "--streaming", "false", "--batch_size", "8",
    ])  # fmt: skip
    assert cfg.tiny_clip == {"image_size": 16, "num_layers": 2}
    assert cfg.learning_rate == 1e-3 and cfg.ce_weight == 2.0 and isinstance(cfg.ce_weight, float)
    assert cfg.robustness is True and cfg.streaming is False and cfg.batch_size == 8


@pytest.mark.parametrize(
    "argv", [["--mixed_precision", "fp64"], ["--batch_size", "eight"], ["--tiny_clip", "16"], ["--robustness", "maybe"]]
)
def test_a_bad_value_is_a_usage_error_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_the_command_line_overrides_the_preset_which_overrides_the_defaults():
    cfg = parse_args(["--config", "genimage_sd14", "--learning_rate", "0.01"])
    assert cfg.clip_model == "openai/clip-vit-large-patch14"  # preset over default
    assert cfg.learning_rate == 0.01 and cfg.mixed_precision == "bf16"  # command line over preset
    assert parse_args([]).clip_model == "tiny-pretrained"  # the demo preset by default


def test_inconsistent_options_fail_before_any_work():
    with pytest.raises(ValueError, match="mirage-eval needs --model"):
        EvalConfig()


def test_a_preset_with_an_unknown_or_bad_value_fails(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rat"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "fp64.yaml").write_text("mixed_precision: fp64\n")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        parse_args(["--config", str(tmp_path / "fp64.yaml")])


def test_every_user_facing_mirage_config_field_is_a_train_option_with_its_default():
    """A new MiraGeConfig field reaches train.py (and `from_clip`) with no second edit."""
    fields = {f.name: f for f in dataclasses.fields(ModelOptions)}
    assert set(fields) == set(MiraGeConfig.__annotations__) - set(NOT_OPTIONS)
    defaults = MiraGeConfig(clip_config={"text_config": {"num_hidden_layers": 12}})
    for name in fields:
        assert getattr(TrainConfig(), name) == (getattr(defaults, name) if name != "class_names" else None), name
    cfg = parse_args(["--anchor_margin", "0.3", "--mode", "coop"])
    assert cfg.model_options()["anchor_margin"] == 0.3 and cfg.model_options()["mode"] == "coop"


def test_every_option_of_every_command_says_what_it_does():
    """Each TrainConfig and EvalConfig field has its help text, and so has every option of every console script in
    setup.cfg (`--help` is the documentation a user reads first)."""
    from mirage_hf import adaptation, cli, hub, onnx_export

    for config_class in (TrainConfig, EvalConfig):
        bare = [f.name for f in dataclasses.fields(config_class) if not f.metadata.get("help", "").strip()]
        assert not bare, (config_class.__name__, bare)
    parsers = {
        "mirage-train": lambda: build_parser(),
        "mirage-eval": lambda: build_parser(config_class=EvalConfig),
        "mirage-detect": cli.build_parser,
        "mirage-adapt": adaptation.build_parser,
        "mirage-push": hub.build_parser,
        "mirage-export-onnx": onnx_export.build_parser,
    }
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parent.parent / "setup.cfg")
    scripts = [line.split("=")[0].strip() for line in setup["options.entry_points"]["console_scripts"].splitlines()]
    assert sorted(parsers) == sorted(filter(None, scripts))
    for script, make_parser in parsers.items():
        bare = [action.dest for action in make_parser()._actions if not (action.help or "").strip()]
        assert not bare, (script, bare)
