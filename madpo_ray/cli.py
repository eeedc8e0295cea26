"""`madpo`: the command-line entry point: its commands (what each prints: rendering.py).

    madpo run                                  # whole pipeline, embedded default (the tiny preset)
    madpo run policy.loss.beta=0.2 ray.num_workers=1
    madpo train --loss dpo                     # another loss from the same scored pairs
    madpo weights                              # the MADPO weight table
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from madpo_ray import submit as jobs
from madpo_ray.console import configure_logging, quiet_terminal, training_progress
from madpo_ray.data.corpus.debian import DEFAULT_CACHE, build_debian_corpus
from madpo_ray.data.corpus.generated import generate_corpus
from madpo_ray.data.preference import DataValidationError, write_jsonl
from madpo_ray.io import OutputExistsError, check_output_folder
from madpo_ray.layout import BEFORE_POLICY, STAGES, RunLayout
from madpo_ray.rendering import console, print_comparison, print_summary, print_verdicts
from madpo_ray.runlock import RunLockedError
from madpo_ray.runs import KEY_METRICS, format_value, list_runs, progress_text
from madpo_ray.serving.folders import parse_adapter_specs, resolve_model_folder
from madpo_ray.submit import SubmitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Margin-Adaptive DPO on Ray: SFT -> reward model -> scoring -> policy training.")
data_app = typer.Typer(no_args_is_help=True, help="Build corpora: the generated default or Debian descriptions.")
app.add_typer(data_app, name="data")


def fail(message: str, code: int = 1) -> None:
    """Print an error and exit. soft_wrap: the message is never wrapped at the console width,
    so a log, a pipe or a test sees it whole whatever the terminal (or path) length."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)

def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"madpo-ray {version('madpo_ray')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the installed version and exit.")) -> None:
    """Margin-Adaptive DPO on Ray: SFT -> reward model -> scoring -> policy training."""


CONFIG_OPT = typer.Option("tiny", "--config", "-c", help="A shipped preset's name (madpo init writes them out) or a YAML path.")
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. policy.loss.beta=0.2 ray.num_workers=1")
ADDRESS_OPT = typer.Option(None, "--address", help="Join this Ray cluster (host:port, ray://host:port, or 'auto' "
                           "for the `ray start` cluster on this machine) instead of starting a local one.")
NAME_OPT = typer.Option(None, "--name", help="Run name (folder under runs_dir).")
VERBOSE_OPT = typer.Option(False, "--verbose", "-v", help="Show Ray's, vLLM's and every library's output in the "
                           "terminal. Without it that output goes to <run folder>/logs/madpo.log; our own log "
                           "lines go there either way.")


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _setup_logging() -> None:
    """Every INFO line to the terminal (commands other than the pipeline's)."""
    configure_logging(console, everything=True)


def _load(config: str, overrides: Optional[List[str]], address: Optional[str], name: Optional[str],
          extra: Optional[List[str]] = None):
    from madpo_ray.config import ConfigError, load_config

    sets = list(overrides or []) + list(extra or [])
    if address:
        sets.append(f"ray.address={address}")
    if name:
        sets.append(f"name={json.dumps(name)}")  # quoted: a run called "on" or "1e3" stays a string
    try:
        return load_config(config, sets)
    except ConfigError as e:
        fail(str(e), 2)


def _run(cfg, stages, force: tuple = (), verbose: bool = False, command: str = "run") -> dict:
    """The pipeline with a quiet terminal: stage lines, a progress bar per training, our warnings;
    everything else in the run folder's log (console.py)."""
    from madpo_ray.pipeline import Pipeline

    lay = RunLayout.of(cfg)
    with quiet_terminal(console, lay.log_path, verbose, command):
        console.print(f"madpo {command}: {lay.run_dir}  (full log: {lay.log_path})", soft_wrap=True, highlight=False)
        return run_pipeline(Pipeline(cfg, progress=training_progress(console)), stages, force)


def run_pipeline(pipeline, stages, force: tuple) -> dict:
    """Run it, turning a user's mistake or a full disk into a one-line error."""
    cfg = pipeline.cfg
    try:
        return pipeline.run(tuple(stages), force=tuple(force))
    except _user_errors() as e:
        fail(str(e))
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            fail(f"cannot write {e.filename or 'the run folder'}: {e.strerror}. "
                 f"Free space under {RunLayout.of(cfg).run_dir} and rerun the same command: "
                 "finished stages are kept, the failed one starts again.")
        raise


@app.command()
def run(overrides: Optional[List[str]] = OVERRIDES_ARG, config: str = CONFIG_OPT, address: Optional[str] = ADDRESS_OPT,
        name: Optional[str] = NAME_OPT,
        force: List[str] = typer.Option([], "--force", metavar="STAGE",
                                        help="Redo this stage (and so everything after it) even if up to date; repeatable."),
        verbose: bool = VERBOSE_OPT):
    """Run every stage in order (data, sft, pairs, reward, score, policy, eval).

    A stage whose recorded settings and inputs still match is skipped; one whose settings
    changed is redone, with everything after it, and the log says which setting changed."""
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        fail(f"--force {unknown[0]!r}: not a stage; stages: {', '.join(STAGES)}", 2)
    cfg = _load(config, overrides, address, name)
    results = _run(cfg, STAGES, tuple(force), verbose)
    print_summary(results["eval"], RunLayout.of(cfg).run_dir)


def _stage_command(stages: tuple[str, ...], doc: str):
    def command(overrides: Optional[List[str]] = OVERRIDES_ARG, config: str = CONFIG_OPT,
                address: Optional[str] = ADDRESS_OPT, name: Optional[str] = NAME_OPT,
                force: bool = typer.Option(False, help="Redo this stage even if complete."),
                verbose: bool = VERBOSE_OPT):
        cfg = _load(config, overrides, address, name)
        _run(cfg, stages, stages[-1:] if force else (), verbose, stages[-1])
        console.print_json(json.dumps(RunLayout.of(cfg).read_metrics(stages[-1]), default=str))

    command.__doc__ = doc
    return command


def _through(stage: str) -> tuple[str, ...]:
    """Every stage up to and including `stage`, in pipeline order."""
    return STAGES[:STAGES.index(stage) + 1]


app.command("sft")(_stage_command(_through("sft"), "Supervised fine-tuning (the reference policy)."))
app.command("reward")(_stage_command(_through("reward"), "Train the Bradley-Terry reward model."))
app.command("score")(_stage_command(_through("score"),
                                    "Score pairs with Ray Data: reference log-probs and reward margins."))


@app.command()
def train(overrides: Optional[List[str]] = OVERRIDES_ARG, config: str = CONFIG_OPT,
          loss: Optional[str] = typer.Option(None, help="Registered loss: madpo, dpo, ipo, beta_dpo, madpo_amplify, madpo_regularize."),
          address: Optional[str] = ADDRESS_OPT, name: Optional[str] = NAME_OPT,
          force: bool = typer.Option(False, help="Retrain even if this loss's policy is complete."),
          margins_from: Optional[str] = typer.Option(None, "--margins-from", metavar="reward_model|data",
                                                     help="data: use the dataset's own 'margin' column and train no "
                                                     "reward model (score.margins_from)."),
          verbose: bool = VERBOSE_OPT):
    """Train a policy with any registered loss from the scored pairs, then evaluate it.

    --loss keeps the config's loss parameters the new loss also takes (beta) and drops the others.
    --margins-from data trains MADPO from per-pair margins you already have."""
    sets = list(overrides or []) + ([f"score.margins_from={margins_from}"] if margins_from else [])
    cfg = _load(config, sets, address, name)
    if loss:
        try:
            cfg.policy.loss = cfg.policy.loss.switched_to(loss)
        except (KeyError, ValueError) as e:
            fail(str(e), 2)
    results = _run(cfg, STAGES, ("policy",) if force else (), verbose, "train")
    print_summary(results["eval"], cfg.run_dir)


FINAL_OPT = typer.Option(False, "--final", help="The explicit final step: judge the same trainings on the sealed "
                         "test split (every other report reads validation), write the report in final/ and record "
                         "the reading in the run's final_readings.jsonl.")


def compare_sets(tiers: Optional[str], ablations: bool, tuned: bool, final: bool = False,
                 lr_grid: Optional[str] = None) -> list[str]:
    """The config overrides that `madpo compare`'s options stand for."""
    sets = ["compare.final=true"] if final else []
    if lr_grid:
        sets.append(f"compare.lr_grid={json.dumps(parse_floats(lr_grid, '--lr-grid'))}")
    if tiers:
        names = [t.strip() for t in tiers.split(",") if t.strip()]
        sets.append(f"compare.tiers={json.dumps(names)}")
    if ablations:
        sets.append("compare.ablations=true")
    if tuned:
        sets.append("compare.settings=tuned")
    return sets


@app.command()
def compare(overrides: Optional[List[str]] = OVERRIDES_ARG, config: str = CONFIG_OPT,
            address: Optional[str] = ADDRESS_OPT, name: Optional[str] = NAME_OPT,
            tiers: Optional[str] = typer.Option(None, "--tiers", help="Comma-separated data-quality tiers, e.g. "
                                                "high,medium,low: one comparison per tier in runs/<name>-<tier>, "
                                                "and a combined report in runs/<name>/compare_tiers/."),
            ablations: bool = typer.Option(False, "--ablations", help="Also train madpo_amplify and madpo_regularize."),
            tuned: bool = typer.Option(False, "--tuned", help="Each method takes the best settings of its own "
                                       "finished `madpo tune` search (tune/<search>/best_config.yaml); a method "
                                       "without one is an error. Without --tuned every method trains at the same "
                                       "untuned reference settings (compare.reference_beta, compare.reference_lr)."),
            lr_grid: Optional[str] = typer.Option(None, "--lr-grid", help="Comma-separated learning rates, e.g. "
                                                  "1e-5,5e-5,2e-4: the untuned comparison at each (every method at "
                                                  "the same beta and that lr), one report over the grid."),
            final: bool = FINAL_OPT):
    """DPO vs IPO vs beta-DPO vs MADPO over seeds, judged at every decoding temperature.

    Trains each method from the same SFT model and scored pairs (parallel Ray tasks), samples
    every model at each temperature (vLLM or transformers), and judges the validation split with
    gold reward, reward model and win rates, with 95% CIs over seeds and prompts, each method's
    paired difference from the SFT policy, and MADPO-vs-baseline tests Holm-corrected over
    everything the report states. Writes compare/table.md, results.json and a plot into the run
    folder. Test figures come only from --final. Methods, seeds and temperatures are config keys:
    compare.seeds=[0,1,2,3,4] eval.temperatures=[0,0.5,1].
    """
    from madpo_ray.config import ConfigError

    cfg = _load(config, list(overrides or []) + compare_sets(tiers, ablations, tuned, final, lr_grid), address, name)
    _setup_logging()
    try:
        run_comparisons(cfg)
    except _user_errors() + (ConfigError,) as e:
        fail(str(e))


def run_comparisons(cfg) -> None:
    """One comparison, or one per tier or lr grid point with a combined report; prints the tables."""
    from madpo_ray.compare import Comparison, compare_lr_grid, compare_tiers
    from madpo_ray.pipeline import Pipeline

    if cfg.compare.tiers or cfg.compare.lr_grid:
        combined = compare_tiers(cfg) if cfg.compare.tiers else compare_lr_grid(cfg)
        for group, results in combined["per_group"].items():
            print_comparison(results, f"{combined['kind']} {group}: mean {results['column']} reward by temperature, "
                                      f"{len(results['seeds'])} seeds, {results['split']} split")
            print_verdicts(results)
        out = Path(combined["out_dir"])
        plot = out / f"{combined['column']}_vs_temperature_by_{combined['kind']}.png"
        console.print(f"table: {out / 'table.md'}\nplot:  {plot}")
        return
    comparison = Comparison(Pipeline(cfg))
    results = comparison.run()
    print_comparison(results, f"mean {results['column']} reward by temperature, {len(results['seeds'])} seeds, "
                              f"{results['split']} split")
    print_verdicts(results)
    out = comparison.report_dir
    console.print(f"table: {out / 'table.md'}\nplot:  {out / (results['column'] + '_vs_temperature.png')}")


@app.command("init")
def init_cmd(folder: str = typer.Argument(".", help="Where to write configs/ and tune_configs/ (default: here)."),
             force: bool = typer.Option(False, "--force", help="Overwrite files of the same name.")):
    """Write the shipped presets, search spaces and Serve config into FOLDER/configs/,
    FOLDER/tune_configs/ and FOLDER/serve_config.yaml for editing; run an edited one by path:
    `madpo run -c configs/tiny.yaml`, `serve deploy serve_config.yaml`. Existing files are kept unless --force."""
    from importlib import resources

    from madpo_ray.config import PRESETS
    from madpo_ray.tune_space import SEARCH_SPACES

    written, kept = [], []
    for source, subfolder in ((PRESETS, "configs"), (SEARCH_SPACES, "tune_configs")):
        out = Path(folder) / subfolder
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(source.iterdir(), key=lambda f: f.name):
            if not f.name.endswith(".yaml"):
                continue
            target = out / f.name
            if target.exists() and not force:
                kept.append(str(target))
                continue
            target.write_text(f.read_text())
            written.append(str(target))
    serve_config = Path(folder) / "serve_config.yaml"
    if serve_config.exists() and not force:
        kept.append(str(serve_config))
    else:
        serve_config.write_text((resources.files("madpo_ray") / "serving" / "config.yaml").read_text())
        written.append(str(serve_config))
    console.print(f"wrote {len(written)} files into {folder}/configs, {folder}/tune_configs and {serve_config}",
                  highlight=False)
    if kept:
        console.print(f"kept {len(kept)} existing files (--force overwrites them): {', '.join(kept[:4])}"
                      + (" ..." if len(kept) > 4 else ""), highlight=False, soft_wrap=True)
    console.print(f"run one:  madpo run -c {Path(folder) / 'configs' / 'tiny.yaml'}", highlight=False)


@app.command("runs")
def runs_cmd(runs_dir: str = typer.Argument("runs", help="The folder that holds run folders (runs_dir)."),
             as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")):
    """List the runs under RUNS_DIR, newest first: finished stages and key metrics.

    The curves of every training are in each run's mlruns/ (MLflow) and tensorboard/ folders:
    `tensorboard --logdir runs/NAME/tensorboard`."""
    try:
        rows = list_runs(runs_dir)
    except FileNotFoundError as e:
        fail(str(e))
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=f"runs in {runs_dir} (gold: greedy gold reward and RM acc, validation split)")
    text_columns = ("run", "modified", "stages", "policies")
    for name in (*text_columns, "RM acc", *KEY_METRICS.values()):
        table.add_column(name, justify="left" if name in text_columns else "right")
    for r in rows:
        policies = ", ".join(s.split("/", 1)[1] for s in r["stages"] if s.startswith("policy/"))
        table.add_row(r["name"], r["modified"][5:], progress_text(r["stages"]), policies,
                      format_value(r["rm_accuracy_validation"]), *[format_value(r[k]) for k in KEY_METRICS])
    console.print(table)


@app.command("export")
def export_cmd(run_dir: str = typer.Argument(..., help="A run folder, e.g. runs/tiny."),
               stage: str = typer.Option("policy", "--stage", help="sft, reward or policy."),
               loss: Optional[str] = typer.Option(None, "--loss", help="Which policy/<loss>/ (default: the run's loss)."),
               out: Optional[str] = typer.Option(None, "--out", help="Output folder; default <run>/export/<stage>[-<loss>]. "
                                                 "An existing folder is replaced only if an export wrote it."),
               force: bool = typer.Option(False, "--force", help="Replace --out even if madpo did not write it.")):
    """Write a stage's model as a merged HF folder with a model card (README.md: base model and
    its license, data, loss and parameters, metrics, config), ready for any hub's upload client."""
    from madpo_ray.config import ConfigError
    from madpo_ray.export import export_run

    try:
        folder = export_run(Path(run_dir), stage, loss, Path(out) if out else None, force=force)
    except _user_errors() + (ConfigError, ValueError, OutputExistsError) as e:
        fail(str(e))
    console.print(f"exported {stage} to {folder}", highlight=False, soft_wrap=True)


study_app = typer.Typer(no_args_is_help=True, help="Studies of the method: how MADPO behaves as conditions change.")
app.add_typer(study_app, name="study")


def parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} {text!r}: expected comma-separated numbers, e.g. 0,1,2,4", 2)


@study_app.command("rm-noise")
def study_rm_noise(overrides: Optional[List[str]] = OVERRIDES_ARG, config: str = CONFIG_OPT,
                   address: Optional[str] = ADDRESS_OPT, name: Optional[str] = NAME_OPT,
                   noise: str = typer.Option("0,1,2,4", "--noise", help="Standard deviations of the Gaussian noise "
                                             "added to the reward-model margins, comma-separated."),
                   tuned: bool = typer.Option(False, "--tuned", help="DPO and MADPO each at its own finished "
                                              "search's settings, as `madpo compare --tuned`."),
                   final: bool = FINAL_OPT):
    """Robustness to reward-model error: MADPO trained on margins plus N(0, sd^2) at each --noise
    level, against DPO (which reads no margins, so it is trained once), over compare.seeds, judged
    on the validation prompts (the sealed test split with --final) at every eval.temperatures. Writes
    runs/<name>/study/rm-noise/ (table.md, results.json, noise.png; final/ with --final). Stages up
    to score are the run's own, reused when up to date."""
    from madpo_ray.config import ConfigError
    from madpo_ray.study import render_noise_table, run_rm_noise

    levels = parse_floats(noise, "--noise")
    if not levels or min(levels) < 0 or len(set(levels)) != len(levels):
        fail(f"--noise {noise!r}: give distinct standard deviations >= 0, e.g. 0,1,2,4", 2)
    cfg = _load(config, list(overrides or []) + compare_sets(None, False, tuned, final), address, name)
    _setup_logging()
    try:
        results = run_rm_noise(cfg, levels)
    except _user_errors() + (ConfigError,) as e:
        fail(str(e))
    for line in render_noise_table(results["noise"], results["column"]):
        console.print(line, highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(models: List[str] = typer.Argument(..., help="Policy folders to judge (ours or any HF causal LM), "
                                                "optionally LABEL=FOLDER."),
             overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Dotted override (repeatable)."),
             config: str = CONFIG_OPT, name: Optional[str] = NAME_OPT, address: Optional[str] = ADDRESS_OPT,
             out: Optional[str] = typer.Option(None, help="Output folder; default <run>/eval/<labels>.")):
    """Judge saved policy folders at every decoding temperature, as `madpo compare` does.

    Against the run's SFT policy, held-out prompts, reward model and (testbed) gold reward;
    the run's stages up to score are reused, or run first."""
    from madpo_ray.config import check_path_component

    cfg = _load(config, overrides, address, name)
    pairs = []
    for text in models:
        label, _, folder = text.rpartition("=") if "=" in text else ("", "", text)
        folder_path = Path(folder)
        if not (folder_path / "config.json").exists():
            fail(f"{folder}: not a model folder (no config.json)", 2)
        if not label:  # runs/x/policy/madpo/model -> "madpo"
            label = folder_path.parent.name if folder_path.name == "model" else folder_path.name
        try:
            pairs.append((check_path_component(label, "label"), folder_path))
        except ValueError as e:
            fail(str(e), 2)
    # Torch, transformers and Ray's logging set-up (4 s) only once the arguments are known to be good.
    from madpo_ray.eval.report import evaluate_models
    from madpo_ray.pipeline import Pipeline

    _setup_logging()
    p = Pipeline(cfg)
    try:
        p.run(BEFORE_POLICY)
        target = Path(out) if out else p.layout.stage_dir("eval") / "__".join(lbl for lbl, _ in pairs)
        results = evaluate_models(cfg, p.layout, pairs, target)
    except _user_errors() as e:
        fail(str(e))
    print_comparison(results, f"mean {results['column']} reward by temperature")
    console.print(f"table: {target / 'table.md'}")


def _user_errors() -> tuple:
    from madpo_ray.losses import LossParameterError
    from madpo_ray.models import ModelLoadError

    return (DataValidationError, ModelLoadError, FileNotFoundError, LossParameterError, RunLockedError)


@app.command()
def weights(c_max: List[float] = typer.Option([2.0, 4.0], help="c_max values (repeatable)."),
            lam: float = typer.Option(1.0), tau: Optional[float] = typer.Option(None, help="Default ln(999).")):
    """Print the MADPO scale c(|m|) and weight w(m) over a range of reward margins."""
    from madpo_ray.losses import DEFAULT_TAU, weights_table

    tau = DEFAULT_TAU if tau is None else tau

    rows = weights_table(c_maxes=tuple(c_max), lam=lam, tau=tau)
    table = Table(title=f"MADPO weights (lam={lam}, tau={tau:.3f})")
    table.add_column("margin m", justify="right")
    for cm in c_max:
        table.add_column(f"c (c_max={cm:g})", justify="right")
        table.add_column(f"w (c_max={cm:g})", justify="right")
    margins = sorted({r["margin"] for r in rows})
    for m in margins:
        cells = [f"{m:g}"]
        for cm in c_max:
            r = next(r for r in rows if r["margin"] == m and r["c_max"] == cm)
            cells += [f"{r['c']:.2f}", f"{r['weight']:.2f}"]
        table.add_row(*cells)
    console.print(table)


@data_app.command("generate")
def data_generate(out: str = typer.Option("generated_docs.jsonl", help="Output JSONL."),
                  num_documents: int = typer.Option(1000), seed: int = typer.Option(0),
                  terse_share: float = typer.Option(0.0, min=0.0, max=1.0,
                                                    help="Share of demonstrations that leave the language out.")):
    """Write the embedded generated corpus (documents, reference synopses, key facts) to JSONL."""
    write_jsonl([d.to_dict() for d in generate_corpus(num_documents, seed, terse_share=terse_share)], Path(out))
    console.print(f"wrote {num_documents} documents to {out}")


@data_app.command("debian")
def data_debian(cache_dir: Optional[str] = typer.Option(None, help="Default ~/.cache/madpo-ray/debian."),
                fetch: bool = typer.Option(True, help="Run apt-get update into a private lists dir first.")):
    """Build the Debian package-description corpus (local cache, never committed)."""
    _setup_logging()
    counts = build_debian_corpus(Path(cache_dir) if cache_dir else DEFAULT_CACHE, fetch=fetch)
    console.print(counts)


@app.command()
def tune(overrides: Optional[List[str]] = OVERRIDES_ARG,
         config: str = typer.Option("madpo_default", "--config", help="Search space: a shipped one's name or a YAML path."),
         pipeline: str = typer.Option("tiny", "--pipeline", "-p", help="Pipeline preset (name or YAML path) the trials start from."),
         resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search (finished trials are kept)."),
         num_samples: Optional[int] = typer.Option(None, help="Override the search space's num_samples."),
         cpus_per_trial: float = typer.Option(1.0, help="CPUs per trial; concurrent trials = cluster CPUs / this."),
         address: Optional[str] = ADDRESS_OPT, name: Optional[str] = NAME_OPT):
    """Ray Tune search over MADPO's weighting hyperparameters (c_max, tau, lam, beta, lr) from the scored pairs."""
    from madpo_ray.config import ConfigError
    from madpo_ray.pipeline import Pipeline
    from madpo_ray.tune import run_search
    from madpo_ray.tune_space import load_search_space

    try:
        space = load_search_space(config)
    except ConfigError as e:
        fail(str(e), 2)
    fixed = [f"{k}={v}" for k, v in space.fixed.items()]
    cfg = _load(pipeline, list(overrides or []) + fixed, address, name)
    _run(cfg, BEFORE_POLICY)
    p = Pipeline(cfg)
    try:
        summary = run_search(p, space, resume=resume, num_samples=num_samples, cpus_per_trial=cpus_per_trial)
    except _user_errors() + (ConfigError,) as e:
        fail(str(e))
    out = p.layout.tune_dir / space.name
    console.print((out / "trials.md").read_text())
    console.print_json(json.dumps(summary, default=str))
    console.print(f"results: {out}/trials.csv, trials.md, best_config.yaml, search.png")


model_app = typer.Typer(no_args_is_help=True, help="Bring pretrained models in: GGUF checkpoints to HF folders.")
app.add_typer(model_app, name="model")


@model_app.command("import-gguf")
def model_import_gguf(gguf_file: str = typer.Argument(..., help="A .gguf file (any llama.cpp quantisation)."),
                      out: str = typer.Argument(..., help="Output HF folder (tokenizer, chat template, safetensors); "
                                                "an existing one is replaced only if this command wrote it."),
                      force: bool = typer.Option(False, "--force", help="Replace OUT even if madpo did not write it.")):
    """Dequantise a GGUF causal LM into a normal HF folder that every stage, vLLM and `madpo serve` load.

    Needs the `gguf` extra. Then: madpo run model.name_or_path=OUT ..."""
    if not Path(gguf_file).is_file():  # a mistyped path or an output that is not ours fails at once, not
        fail(f"{gguf_file}: no such GGUF file")  # after torch and transformers are imported
    try:
        check_output_folder(Path(out), force)
    except OutputExistsError as e:
        fail(str(e))
    from madpo_ray.models import ModelLoadError, import_gguf

    _setup_logging()
    try:
        info = import_gguf(Path(gguf_file), Path(out), force=force)
    except (ModelLoadError, OutputExistsError) as e:
        fail(str(e))
    console.print(f"wrote {out}: {info['architecture']}, {info['parameters']:,} parameters, vocab {info['vocab_size']}"
                  f"{', chat template' if info['chat_template'] else ''}")


jobs_app = typer.Typer(no_args_is_help=True, help="Follow jobs sent with `madpo submit`.")
app.add_typer(jobs_app, name="jobs")
JOB_ADDRESS_OPT = typer.Option(None, "--address", help="Ray dashboard / job server URL (default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265).")
TOKEN_OPT = typer.Option(None, "--token", help="Ray auth token (default $RAY_AUTH_TOKEN or ~/.ray/auth_token). Never printed.")


def _jobs_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SubmitError as e:
        fail(str(e))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context, address: Optional[str] = JOB_ADDRESS_OPT, token: Optional[str] = TOKEN_OPT,
           pip: List[str] = typer.Option([], "--pip", help="Extra pip requirement for the job's runtime_env (repeatable)."),
           env: List[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable). Names that "
                                  "look like secrets (TOKEN, KEY, PASSWORD...) are refused: job settings are readable "
                                  "by anyone who can list jobs; mount the secret as a file instead."),
           job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: generated)."),
           follow: bool = typer.Option(False, "--follow/--no-follow", help="Stream logs until the job ends.")):
    """Submit a madpo command to a Ray cluster: `madpo submit --address URL -- run data.num_documents=500`."""
    env_vars = {}
    for item in env:
        if "=" not in item:
            fail(f"--env {item!r} must be KEY=VALUE", 2)
        k, v = item.split("=", 1)
        env_vars[k] = v
    jid = _jobs_call(jobs.submit, ctx.args, address=address, token=token, pip=pip or None, env_vars=env_vars,
                     job_id=job_id, notify=lambda m: console.print(f"[yellow]{m}[/yellow]", soft_wrap=True))
    console.print(f"submitted job [bold]{jid}[/bold]")
    console.print(f"follow it:  madpo jobs logs {jid} --follow   |   stop it:  madpo jobs stop {jid}")
    if follow:
        final = _jobs_call(jobs.follow, jid, address, token)
        console.print(f"job {jid}: {final}")
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@jobs_app.command("status")
def jobs_status(job_id: str, address: Optional[str] = JOB_ADDRESS_OPT, token: Optional[str] = TOKEN_OPT):
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    console.print(_jobs_call(jobs.status, job_id, address, token))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: Optional[str] = JOB_ADDRESS_OPT, token: Optional[str] = TOKEN_OPT,
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends.")):
    """Print (or stream) the job's logs."""
    if follow:
        final = _jobs_call(jobs.follow, job_id, address, token)
        console.print(f"job {job_id}: {final}")
    else:
        print(_jobs_call(jobs.logs, job_id, address, token), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: Optional[str] = JOB_ADDRESS_OPT, token: Optional[str] = TOKEN_OPT):
    """Ask the cluster to stop the job."""
    console.print("stop requested" if _jobs_call(jobs.stop, job_id, address, token) else "job already finished")


@app.command("serve")
def serve_cmd(model: str = typer.Option(..., "--model", help="Policy folder, e.g. runs/tiny/policy/madpo/model."),
              host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 to accept remote clients)."),
              port: int = typer.Option(8000),
              replicas: int = typer.Option(1, help="Serve replicas."),
              num_cpus: float = typer.Option(1.0, help="CPUs per replica (fractional is fine)."),
              batching: bool = typer.Option(True, "--batching/--no-batching", help="Dynamic batching of concurrent requests."),
              max_batch_size: int = typer.Option(16),
              backend: str = typer.Option("auto", help="Generation engine: vllm (async engine, continuous batching, "
                                                       "token streaming), transformers, or auto: vllm when it is installed "
                                                       "and supports the model."),
              insecure: bool = typer.Option(False, "--insecure",
                                            help="Allow a non-loopback --host without an API key (MADPO_API_KEY_FILE / MADPO_API_KEY)."),
              lora: list[str] = typer.Option([], "--lora", metavar="NAME=FOLDER",
                                             help="Serve a LoRA adapter unmerged beside --model (the base it was trained "
                                                  "from, e.g. runs/x/sft/model), answering to `model: NAME`. FOLDER is a "
                                                  "stage trained with model.lora (its adapter/) or a peft adapter folder. "
                                                  "Repeatable; needs the vLLM backend."),
              ingress: str = typer.Option("auto", help="How HTTP reaches the replicas of the local cluster: haproxy "
                                                      "(Serve's HAProxy ingress, the fastest; auto's pick where the "
                                                      "binary ray[serve] bundles on Linux is found), proxy (Serve's "
                                                      "proxy actor), direct (each replica's own port, port+1 and up, "
                                                      "beside the proxy actor; experimental in Ray 2.60). haproxy "
                                                      "also takes port+1 to port+103, direct port+1 to port+100."),
              direct_ingress: bool = typer.Option(False, "--direct-ingress", hidden=True,
                                                  help="The same as --ingress direct (kept for old scripts)."),
              address: Optional[str] = ADDRESS_OPT):
    """Serve a policy over HTTP with Ray Serve (OpenAI-compatible routes; set MADPO_API_KEY to require a key)."""
    from madpo_ray.serving.launch import InsecureServeError, check_exposure, key_configured, run_server

    try:  # a public bind without a key fails before transformers is imported (run_server checks again)
        check_exposure(host, key_configured(), insecure)
    except InsecureServeError as e:
        fail(str(e), 2)
    from madpo_ray.models import ModelLoadError, check_model_files

    model = resolve_model_folder(model)  # a stage folder (runs/<name>/policy/madpo) means its model/
    try:
        check_model_files(model)
    except ModelLoadError as e:
        fail(str(e))
    if not Path(model).is_dir():
        fail(f"{model}: not a folder")
    if direct_ingress and ingress not in ("auto", "direct"):
        fail(f"--direct-ingress means --ingress direct, not {ingress}", 2)
    _setup_logging()
    try:
        adapters = parse_adapter_specs(lora)
        run_server(str(Path(model).resolve()), host=host, port=port, replicas=replicas, num_cpus=num_cpus,
                   batching=batching, max_batch_size=max_batch_size, address=address, blocking=True, backend=backend,
                   insecure=insecure, ingress="direct" if direct_ingress else ingress,
                   **({"adapters": adapters} if adapters else {}))
    except (ValueError, PermissionError) as e:  # e.g. a public bind without a key
        fail(str(e), 2)
