"""`mirage-eval`: evaluate a trained detector (a folder or Hub id) on a data set, as it will be used.

    mirage-eval --model outputs/demo/model --config demo                 # the demo's test set
    mirage-eval --model outputs/genimage_sd14/model --dataset genimage:/data/GenImage --robustness
    mirage-eval --model DIR --backend onnx-int8 --dataset ...            # what the int8 export costs
    accelerate launch --multi_gpu -m mirage_hf.evaluate_model --model DIR --dataset ...

It scores with the model's own calibration and preprocessing (or --eval_preprocess), prints the tables and writes
<output_dir>/eval_results.json; with an ONNX backend also eval_results_<backend>.json beside the graph, for the
model card. It exports nothing. Options: the evaluation's of mirage-train (EvaluationOptions) plus the model.
"""

from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .commands import one_line_errors
from .data_sources import load_split, resolve_dataset
from .engine import make_accelerator
from .evaluation import Evaluation
from .progress import configure_logging
from .scoring import ModelNotFound, load_scorer
from .train_config import EvalConfig, parse_args
from .transforms import scoring_preprocessor

PROG = "mirage-eval"


def evaluate_model(cfg: EvalConfig) -> dict:
    """Evaluates `cfg.model` on the test data; returns the eval_results.json summary."""
    cfg.use_threads()
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision)
    configure_logging()
    scorer = load_scorer(cfg.model, cfg.backend, device=accelerator.device, compile=cfg.compile)
    image_processor = AutoImageProcessor.from_pretrained(cfg.model)
    source = resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset, trained_model=cfg.model)
    eval_set = load_split(cfg, source, cfg.eval_split, cfg.eval_subsets, cfg.max_eval_samples)
    preprocess = scoring_preprocessor(image_processor, scorer.config, cfg.eval_preprocess)
    evaluation = Evaluation(
        cfg, accelerator, eval_set, preprocess, image_processor, model_name=cfg.model, backend=cfg.backend
    )
    return evaluation.final(scorer)


def main(argv: list[str] | None = None) -> dict:
    with one_line_errors(PROG, FileNotFoundError, ValueError):  # no such preset, options that do not fit
        cfg = parse_args(argv, EvalConfig)
    with one_line_errors(PROG, ModelNotFound):  # a set-up problem, not a bug: one line, not a traceback
        return evaluate_model(cfg)


def script() -> None:
    """`mirage-eval`: `main` on the command line (a console script would exit with its results)."""
    main()


if __name__ == "__main__":
    script()
