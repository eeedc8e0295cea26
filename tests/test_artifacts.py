"""Corrupt weights are a one-line ModelLoadError; a folder replacement is all-or-nothing."""

import shutil

import pytest

from madpo_ray.artifacts import replace_folder_atomically, verify_weights
from madpo_ray.models import ModelLoadError


def weights_of(folder):
    [f] = sorted(folder.glob("*.safetensors"))
    return f


def test_good_weights_pass(tiny_base_dir):
    verify_weights(tiny_base_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_weights_are_one_line_model_load_errors(tiny_base_dir, tmp_path, damage):
    folder = tmp_path / "m"
    shutil.copytree(tiny_base_dir, folder)
    f = weights_of(folder)
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(ModelLoadError) as err:
        verify_weights(folder)
    assert str(f) in str(err.value) and "\n" not in str(err.value) and err.value.__cause__ is None


def test_replace_swaps_the_whole_folder(tmp_path):
    dest, new = tmp_path / "model", tmp_path / "model.tmp"
    dest.mkdir()
    (dest / "w").write_text("old")
    (dest / "stale").write_text("only in the old model")
    new.mkdir()
    (new / "w").write_text("new")
    replace_folder_atomically(new, dest)
    assert (dest / "w").read_text() == "new" and not (dest / "stale").exists()
    assert not new.exists() and not (tmp_path / "model.old").exists()


def test_replace_into_a_new_place_and_after_a_crash_between_renames(tmp_path):
    dest = tmp_path / "model"
    (tmp_path / "model.old").mkdir()  # a crash left the old copy aside
    new = tmp_path / "t"
    new.mkdir()
    (new / "w").write_text("new")
    replace_folder_atomically(new, dest)
    assert (dest / "w").read_text() == "new" and not (tmp_path / "model.old").exists()
