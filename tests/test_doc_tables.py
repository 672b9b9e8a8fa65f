"""The results tables quoted in the docs are the renderings of their commands' results files (tools/doc_tables.py),
and the check CI runs after a fresh demo catches a table that is not what the demo printed."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "tools" / "doc_tables.py")
doc_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(doc_tables)


def test_every_generated_table_in_the_docs_is_the_rendering_of_its_results_file(capsys):
    assert doc_tables.main(["--check"]) == 0, capsys.readouterr().out
    docs = "".join((ROOT / doc).read_text() for doc in doc_tables.DOCS)
    assert all(f"<!-- table:{name} -->" in docs for name in doc_tables.TABLES)


def test_the_demo_table_is_what_the_demo_prints(capsys):
    """The block is exactly the text training prints after the demo (results_table), title line included."""
    from mirage_hf.evaluation import results_table

    results = json.loads((doc_tables.RESULTS / "demo_eval_results.json").read_text())
    printed = results_table(results)
    assert printed.splitlines()[0].endswith(", backend: torch")
    assert f"<!-- table:demo -->\n```\n{printed}\n```\n<!-- /table:demo -->" in (ROOT / "README.md").read_text()


def test_the_check_fails_on_a_run_whose_numbers_differ(tmp_path, capsys):
    results = json.loads((doc_tables.RESULTS / "demo_eval_results.json").read_text())
    results["threshold"] += 0.01
    results["clean"]["mean"]["accuracy"] -= 0.1
    (tmp_path / "eval_results.json").write_text(json.dumps(results))
    assert doc_tables.main(["--check", "--demo", str(tmp_path / "eval_results.json")]) == 1
    diff = capsys.readouterr().out
    assert "-threshold" in diff and "+threshold" in diff
