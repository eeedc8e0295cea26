"""Corrupt weights are a one-line ModelLoadError; a folder replacement is all-or-nothing."""

import shutil

import pytest

from madpo_ray.models import verify_weights
from madpo_ray.io import replace_folder_atomically
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


def test_replace_into_a_new_place_never_touches_a_sibling_it_did_not_make(tmp_path):
    dest = tmp_path / "model"
    (tmp_path / "model.old").mkdir()  # someone's backup (or an old version's leftover): not ours to delete
    (tmp_path / "model.old" / "keep").write_text("theirs")
    new = tmp_path / "t"
    new.mkdir()
    (new / "w").write_text("new")
    replace_folder_atomically(new, dest)
    assert (dest / "w").read_text() == "new" and (tmp_path / "model.old" / "keep").read_text() == "theirs"
    again = tmp_path / "t2"
    again.mkdir()
    (again / "w").write_text("newer")
    replace_folder_atomically(again, dest)  # the old copy goes aside under a fresh name, then away
    assert (dest / "w").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old"]


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from madpo_ray.io import atomic_file, write_json

    target = write_json(tmp_path / "metrics.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text('{"a": ')  # half written, then the disk fills
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "a": 1\n}' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    write_json(target, {"a": 2})
    from madpo_ray.io import UMASK

    assert '"a": 2' in target.read_text() and target.stat().st_mode & 0o777 == 0o666 & ~UMASK  # not mkstemp's 0600


def test_a_folder_write_that_fails_leaves_nothing_behind(tmp_path):
    from madpo_ray.io import atomic_folder

    dest = tmp_path / "scored"
    with pytest.raises(OSError):
        with atomic_folder(dest) as tmp:
            (tmp / "part-0.parquet").write_text("half")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []  # no .scored.partial-* left to pile up run after run
