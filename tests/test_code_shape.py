"""Rules of the codebase that a reviewer would otherwise check by hand: functions short enough to
read at once, no private names imported across modules, no unsafe checkpoint loads, no sys.path
edits, the run folder's paths built only by the layout, imports without circles or needless
laziness (import_graph.py), and one launcher for every training."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import import_graph
import pytest

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
    """`... / "model"` next to a stage name, or a hand-built scored/DONE path, outside layout.py (and the
    DONE records of provenance.py)."""
    pattern = re.compile(r'/ "(model|DONE|scored|train_docs\.jsonl|test_docs\.jsonl)"')
    hits = [f"{f.relative_to(PACKAGE)}: {line.strip()}" for f in SOURCES if f.name not in ("layout.py", "provenance.py")
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


# Layers: data/ is below serving/ (training never imports the server), stages/ below eval/ (a stage,
# the eval stage included, computes what it needs from the layers below; comparisons and reports
# read the stages' outputs, not the reverse).
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


def test_every_batch_generation_goes_through_the_generator_interface():
    """One way to generate offline (pairs, eval stage, Tune, compare): `model.generate` and the
    transformers helper are called in generation.py only; serving/ (online engines: streamed,
    cancellable, admitted request by request) is the other place a model generates."""
    hits = [f"{f.relative_to(PACKAGE)}:{n.lineno}" for f in sorted(PACKAGE.rglob("*.py"))
            if f.name != "generation.py" and f.parent.name != "serving" for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None))
            in ("generate", "generate_transformers")]
    assert hits == []


def test_every_stage_and_trial_takes_its_engine_from_eval_backend():
    """Kills a caller that picks an engine itself and so ignores eval.backend: engines are built
    in generation.py only, and the pairs stage, the eval stage and Tune's trials ask
    `stage_generator(cfg)` (compare's actor asks `make_generator(cfg.eval.backend)`)."""
    built = [f"{f.relative_to(PACKAGE)}:{n.lineno}" for f in sorted(PACKAGE.rglob("*.py")) if f.name != "generation.py"
             for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", None)) in ("TransformersGenerator", "VLLMGenerator")]
    assert built == []
    for module in ("pipeline.py", "stages/eval.py", "tune.py"):
        assert "stage_generator(self.cfg" in (PACKAGE / module).read_text() or \
            "stage_generator(cfg" in (PACKAGE / module).read_text(), module
    assert "make_generator(backend" in (PACKAGE / "eval" / "generate.py").read_text()


def test_the_eval_stage_lives_in_stages():
    from madpo_ray import pipeline
    from madpo_ray.stages import eval as eval_stage

    assert pipeline.evaluate_run is eval_stage.evaluate_run
    assert not (PACKAGE / "eval" / "summary.py").exists() and not (PACKAGE / "eval" / "measures.py").exists()


# ----------------------------------------------------------------------------- imports
def test_no_import_circles_between_our_modules():
    """Kills: a lazy import that hides a cycle (function-level imports count as edges here)."""
    assert import_graph.cycles(import_graph.graph()) == []


def test_our_modules_are_imported_at_the_top_unless_a_heavy_library_justifies_laziness():
    """A function may import one of our modules only when that module brings a heavy library
    (import_graph.HEAVY) that the importing module does not load already: the CLI's `--help`
    must not wait for torch, but nothing else hides its layering inside functions."""
    lazy = import_graph.unjustified_lazy_imports(import_graph.graph())
    assert [f"{i.source}:{i.line} imports {i.target} inside a function" for i in lazy] == []


def test_the_command_line_loads_no_heavy_library_before_a_command_runs():
    """The dynamic check behind the static one above (which cannot see an import a validator runs
    at class creation): `madpo --help` stays instant."""
    code = ("import sys, madpo_ray.cli; print(sorted(m for m in %r if m in sys.modules))"
            % (import_graph.HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_graph_sees_a_lazy_import_and_a_cycle(tmp_path, monkeypatch):
    """The rules above can fail: a two-module package with a lazy, unjustified import that closes
    a cycle is reported as both."""
    pkg = tmp_path / "madpo_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from madpo_ray.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from madpo_ray.a import f\n    return f\n")
    monkeypatch.setattr(import_graph, "PACKAGE", pkg)
    g = import_graph.graph()
    assert import_graph.cycles(g) == [["madpo_ray.a", "madpo_ray.b"]]
    assert [(i.source, i.target) for i in import_graph.unjustified_lazy_imports(g)] == [("madpo_ray.b", "madpo_ray.a")]
    (pkg / "a.py").write_text("import torch\nfrom madpo_ray.b import g\n")  # now a brings torch: b's laziness is justified
    assert import_graph.unjustified_lazy_imports(import_graph.graph()) == []


# ----------------------------------------------------------------------------- one launcher
def test_every_training_is_launched_by_the_launcher():
    """The stage training functions, the tracking wrapper and the fault wrapper are called in one
    module (launcher.py); the pipeline, compare and Tune describe a Training and call `launch`."""
    called = {"train_sft", "train_reward", "train_policy", "tracked", "tracking_target", "FaultInjectingSession"}
    hits = []
    for f, tree in _trees():
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id in called and f.name != "launcher.py":
                hits.append(f"{f.relative_to(PACKAGE)}:{n.lineno} {n.id}")
    assert hits == []
    users = {f.relative_to(PACKAGE).as_posix() for f, tree in _trees() for n in ast.walk(tree)
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "launch"}
    assert users == {"pipeline.py", "compare.py", "tune.py", "launcher.py"}


def test_the_training_loop_has_no_test_hook():
    """Fault injection and batch logging live in a session wrapper (engine/faults.py); `fit` calls
    one per-step callback and names no fault."""
    loop = (PACKAGE / "engine" / "loop.py").read_text()
    assert not re.search(r"\bfault|log_batch|batch_log", loop)
    calls = [n.func.attr for n in ast.walk(ast.parse(loop)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "session"]
    assert sorted(set(calls)) == ["after_step", "prepare", "report_metrics"]


# ----------------------------------------------------------------------------- the map
def map_groups(text: str) -> dict[str, int]:
    """docs/map.md's modules and the rank of their section (1 = first)."""
    groups, rank = {}, 0
    for line in text.splitlines():
        rank += line.startswith("## ")
        for cell in re.findall(r"^\| ([^|]+) \|", line):
            for path in re.findall(r"`([\w/]+\.py)`", cell):
                groups["madpo_ray." + path[:-3].replace("/", ".")] = rank
    return groups


def test_the_map_names_every_module_and_no_module_imports_a_later_section():
    """docs/map.md is the newcomer's one page: every module of the tree in it, none that is gone,
    and its sections in layer order (a module imports only from its own section or earlier ones)."""
    g = import_graph.graph()
    groups = map_groups((PACKAGE.parent / "docs" / "map.md").read_text())
    leaves = {m for m in g if m not in ("madpo_ray", "madpo_ray.__main__") and not any(k.startswith(m + ".") for k in g)}
    assert sorted(leaves - set(groups)) == [] and sorted(set(groups) - set(g)) == []
    upward = [f"{m} imports {t} (line {i.line})" for m, imps in g.items() for i in imps
              for t in [import_graph.internal(i.target, g)] if t in groups and m in groups and groups[t] > groups[m]]
    assert upward == []


def test_the_map_check_sees_a_module_in_a_later_section():
    text = "## A\n| `io.py` | x |\n## B\n| `layout.py` | y |\n"
    assert map_groups(text) == {"madpo_ray.io": 1, "madpo_ray.layout": 2}


def test_a_training_round_trips_through_the_ray_train_loop_config(tmp_path):
    from madpo_ray.config import load_config
    from madpo_ray.launcher import Training, from_loop_config, to_loop_config
    from madpo_ray.stages.outputs import StageOutput

    out = StageOutput(tmp_path / "model", tmp_path / "m.json", tmp_path / "adapter")
    t = Training("reward", load_config("tiny", ["reward.ensemble=3"]), "sft/model", out, {"training": "reward"},
                 {"fail_at_step": 2})
    assert from_loop_config(to_loop_config(t, checkpoint_root="ckpt", order_by="index")) == t
    for bad in (Training("policy", t.cfg, "m", out, options={"label": "x"}), Training("sft", t.cfg, "m")):
        with pytest.raises(ValueError, match="needs an output folder and no in-process options"):
            to_loop_config(bad, checkpoint_root="ckpt", order_by="index")
