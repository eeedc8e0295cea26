"""Rules of the codebase that a reviewer would otherwise check by hand: functions short enough to
read at once, no private names imported across modules, no unsafe checkpoint loads, no sys.path
edits, and the run folder's paths built only by the layout."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "madpo_ray"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _trees():
    return [(f, ast.parse(f.read_text())) for f in SOURCES]


def test_no_function_longer_than_60_lines():
    long = [f"{f.relative_to(PACKAGE)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for f, tree in _trees() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


def test_no_private_name_imported_from_another_of_our_modules():
    bad = [f"{f.relative_to(PACKAGE)}:{n.lineno} {a.name} from {n.module}" for f, tree in _trees()
           for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("madpo_ray")
           for a in n.names if a.name.startswith("_")]
    assert bad == []


def test_no_unsafe_torch_load_and_no_sys_path_edits():
    for f in SOURCES:
        text = f.read_text()
        assert not re.search(r"weights_only\s*=\s*False", text), f
        assert "sys.path" not in text, f


def test_stage_folders_are_built_only_by_the_layout():
    """`... / "model"` next to a stage name, or a hand-built scored/DONE path, outside layout.py."""
    pattern = re.compile(r'/ "(model|DONE|scored|train_docs\.jsonl|test_docs\.jsonl)"')
    hits = [f"{f.relative_to(PACKAGE)}: {line.strip()}" for f in SOURCES if f.name != "layout.py"
            for line in f.read_text().splitlines() if pattern.search(line)]
    assert hits == []


# Modules that select (early stopping, Tune objectives, the calibration helpers): the test split is
# for reports only, so none of them may name it. A second line of defence behind the tests that
# check which split each one reads.
SELECTING_MODULES = ("tune.py", "tune_space.py", "engine/loop.py", "stages/reward.py", "stages/policy.py")


def test_nothing_that_selects_names_the_test_split():
    hits = [f"{name}: {line.strip()}" for name in SELECTING_MODULES
            for line in (PACKAGE / name).read_text().splitlines()
            if re.search(r'["\']test["\']|test_docs|docs_path\(\s*"test', line)]
    assert hits == []


# Layers: data/ is below serving/ (training never imports the server), stages/ below eval/ (a stage
# computes what it needs from the data layer; reports read the stages' outputs, not the reverse).
LAYER_RULES = {"data": ("madpo_ray.serving", "madpo_ray.eval", "madpo_ray.stages"),
               "stages": ("madpo_ray.eval", "madpo_ray.serving")}


def test_no_upward_import_between_layers():
    hits = []
    for layer, forbidden in LAYER_RULES.items():
        for f in sorted((PACKAGE / layer).rglob("*.py")):
            for n in ast.walk(ast.parse(f.read_text())):
                names = [n.module or ""] if isinstance(n, ast.ImportFrom) else \
                    [a.name for a in n.names] if isinstance(n, ast.Import) else []
                hits += [f"{f.relative_to(PACKAGE)}:{n.lineno} imports {m}" for m in names if m.startswith(forbidden)]
    assert hits == []
