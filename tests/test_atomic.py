"""The one atomic writer: a reader finds the old version or the new one, never half of one."""

import pytest

from mirage_hf.atomic import atomic_write


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as staging:
        staging.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and names(tmp_path) == ["scores.csv"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.safetensors").write_text("from the previous export")
    with atomic_write(target) as staging:
        staging.mkdir()
        (staging / "model.safetensors").write_text("new")
    assert names(target) == ["model.safetensors"] and names(tmp_path) == ["model"]


def test_a_leftover_of_a_killed_write_is_cleared_by_the_next(tmp_path):
    (tmp_path / ".tmp-model").mkdir()
    (tmp_path / ".tmp-model" / "partial.bin").write_text("x")
    with atomic_write(tmp_path / "model") as staging:
        staging.mkdir()
        (staging / "config.json").write_text("{}")
    assert names(tmp_path) == ["model"] and names(tmp_path / "model") == ["config.json"]
