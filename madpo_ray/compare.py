"""`madpo compare`: DPO, IPO, beta-DPO and MADPO from the same SFT model and scored pairs,
over several training seeds, judged at every decoding temperature.

    runs/<name>/compare/
      <method>/seed<k>/model/            trained policy (+ metrics.json, DONE)
      generations/<method>__seed<k>.parquet   samples at every temperature
      results.json, table.md             mean gold reward / RM score / win rates with 95% CIs
      gold_vs_temperature.png            one line per method, error bars

Stages before policy (data, sft, pairs, reward, score) are the pipeline's and are reused.
Each (method, seed) training is a Ray task of `compare.cpus_per_training` CPUs, so the
cluster runs as many at once as it has room for; a finished one is never redone (DONE marker),
and an interrupted one resumes from its last checkpoint. Generation runs in one actor with one
engine for every model (vLLM swaps weights in place).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from madpo_ray.config import MethodConfig, PipelineConfig, config_from_dict

log = logging.getLogger("madpo_ray.compare")
SFT = "sft"


def method_config(cfg: PipelineConfig, method: MethodConfig, seed: int) -> PipelineConfig:
    """The pipeline config of one (method, seed) training."""
    sets = [f"policy.loss.name={method.loss}", f"policy.optim.seed={seed}"]
    for key, value in method.overrides.items():
        path = key if key.startswith(("optim.", "loss.")) else f"loss.{key}"
        sets.append(f"policy.{path}={json.dumps(value)}")
    return config_from_dict(cfg.model_dump(mode="json"), sets)


def train_policy(base_config: dict, method: dict, seed: int, scored_train: str, sft_dir: str, out_dir: str,
                 threads: int = 1) -> dict:
    """One (method, seed) policy training in this process: the Ray task body. Resumable."""
    import torch

    from madpo_ray.config import PipelineConfig
    from madpo_ray.data.collate import PairCollator
    from madpo_ray.io import write_json
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.stages._worker import quiet_libraries
    from madpo_ray.stages.common import LocalSession, fit, save_model_atomically
    from madpo_ray.stages.policy import PolicyStep, load_policy_examples

    quiet_libraries()
    torch.set_num_threads(max(1, threads))
    m = MethodConfig.model_validate(method)
    cfg = method_config(PipelineConfig.model_validate(base_config), m, seed)
    out = Path(out_dir)
    examples = load_policy_examples(scored_train, cfg.policy.loss.name)
    tok = load_tokenizer(sft_dir)
    step = PolicyStep(cfg.policy.loss, cfg.policy.optim.seed)
    t0 = time.time()
    result = fit(load_causal_lm(sft_dir, cfg.model.dtype), examples, PairCollator(tok.pad_token_id), step,
                 cfg.policy.optim, stage=f"compare/{m.name}/seed{seed}", extra_state={"beta_dpo": step.beta_state},
                 session=LocalSession(str(out / "checkpoints")))
    save_model_atomically(result.model, tok, out / "model",
                          meta={"stage": "policy", "method": m.name, "seed": seed,
                                "prompt_template": cfg.data.prompt_template})
    # result.metrics carries the final training "loss"; the settings live under "policy".
    metrics = {**result.metrics, "method": m.name, "seed": seed, "policy": cfg.policy.model_dump(mode="json"),
               "steps": result.steps, "seconds": time.time() - t0, "loss_history": result.loss_history}
    write_json(out / "metrics.json", metrics)
    (out / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


class Comparison:
    def __init__(self, pipeline):
        self.p = pipeline
        self.cfg: PipelineConfig = pipeline.cfg
        self.dir = pipeline.run_dir / "compare"

    def training_dir(self, method: str, seed: int) -> Path:
        return self.dir / method / f"seed{seed}"

    def models(self) -> list[tuple[str, int, Path]]:
        """(method, seed, model folder) of everything judged; the SFT policy is seed -1."""
        c = self.cfg.compare
        return [(SFT, -1, self.p.stage_dir("sft") / "model")] + [
            (m.name, s, self.training_dir(m.name, s) / "model") for m in c.methods for s in c.seeds]

    # ------------------------------------------------------------------ training
    def train_all(self) -> dict:
        """Every missing (method, seed) as a Ray task; as many at once as the cluster has CPUs for."""
        import ray

        from madpo_ray.runtime import init_ray, worker_env

        init_ray(self.cfg.ray)
        c = self.cfg.compare
        task = ray.remote(train_policy).options(num_cpus=c.cpus_per_training, max_retries=2,
                                                runtime_env={"env_vars": worker_env()})
        pending, done = {}, {}
        for m in c.methods:
            for seed in c.seeds:
                d = self.training_dir(m.name, seed)
                if (d / "DONE").exists():
                    previous = json.loads((d / "metrics.json").read_text())
                    wanted = method_config(self.cfg, m, seed).policy.model_dump(mode="json")
                    if previous.get("policy") == wanted:
                        done[(m.name, seed)] = previous
                        continue
                    log.warning("compare: %s seed %d was trained with other settings; training it again", m.name, seed)
                    import shutil

                    shutil.rmtree(d)
                ref = task.remote(self.cfg.model_dump(mode="json"), m.model_dump(), seed,
                                  str(self.p.scored_path("train")), str(self.p.stage_dir("sft") / "model"), str(d),
                                  threads=max(1, int(c.cpus_per_training)))
                pending[ref] = (m.name, seed)
        total = len(pending) + len(done)
        log.info("compare: %d trainings (%d already done), %g CPU each, %d CPUs in the cluster",
                 total, len(done), c.cpus_per_training, int(ray.cluster_resources().get("CPU", 0)))
        t0 = time.time()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            done[key] = ray.get(ready[0])  # a task that failed its retries raises here, with its traceback
            log.info("compare: trained %s seed %d in %.0fs (%d/%d, %.0fs elapsed)", key[0], key[1],
                     done[key]["seconds"], len(done), total, time.time() - t0)
        return {f"{k[0]}/seed{k[1]}": {"steps": v["steps"], "seconds": v["seconds"], "final_loss": v.get("loss")}
                for k, v in done.items()}

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        t0 = time.time()
        self.p.run(("data", "sft", "pairs", "reward", "score"))
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(self.cfg.to_yaml())
        t_train = time.time()
        trainings = self.train_all()
        t_gen = time.time()
        rows, self.generation_timings = generate_all(self.p, self.models(), self.dir / "generations")
        t_judge = time.time()
        judged = judge_rows(self.p, rows, [m.name for m in self.cfg.compare.methods])
        return write_report(self.p, self.dir, judged, seeds=self.cfg.compare.seeds,
                            methods=[m.model_dump() for m in self.cfg.compare.methods], trainings=trainings,
                            generation=self.generation_timings,
                            seconds={"pipeline": t_train - t0, "train": t_gen - t_train, "generate": t_judge - t_gen,
                                     "judge": time.time() - t_judge, "total": time.time() - t0})


# --------------------------------------------------------------------------- generation and judging
def eval_prompts(p) -> tuple[list[str], list[str], list[Optional[dict]]]:
    """Held-out prompt ids, prompt texts, and (testbed) their documents, eval.num_prompts of them.

    Testbed runs use the test documents; any other dataset the distinct prompts of its
    held-out pairs (from the scored eval split)."""
    from madpo_ray.io import read_jsonl

    n = p.cfg.eval.num_prompts
    if p.is_testbed:
        docs = read_jsonl(p.stage_dir("data") / "test_docs.jsonl")[:n]
        return ([str(d["doc_id"]) for d in docs], [p.cfg.data.prompt_template.format(document=d["document"])
                                                     for d in docs], docs)
    from madpo_ray.stages.policy import read_scored

    rows = read_scored(p.scored_path("eval"))
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))[:n]
    refs = {}
    for r in rows:
        refs.setdefault(r["prompt"], r["chosen"])  # the labelled-chosen response stands in for a reference
    return ([f"p{i}" for i in range(len(prompts))], prompts,
            [{"reference": refs[x]} for x in prompts])


def generate_all(p, models: list[tuple[str, int, Path]], out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Samples of every model at every temperature; each model's cached in its own parquet."""
    import ray

    from madpo_ray.eval.generate import GenerationActor, SampleSpec, read_generations, write_generations
    from madpo_ray.runtime import init_ray, worker_env

    init_ray(p.cfg.ray)
    spec = SampleSpec.from_config(p.cfg)
    ids, prompts, _ = eval_prompts(p)
    path = {(m, s): Path(out_dir) / f"{m}__seed{s}.parquet" for m, s, _ in models}

    def cache_key(model_dir: Path) -> dict:
        """What a cached parquet must match: the sampling settings, the prompts, the weights' mtime."""
        weights = sorted(Path(model_dir).glob("*.safetensors"))
        return {"spec": dataclasses.asdict(spec), "prompt_ids": ids, "backend": p.cfg.eval.backend,
                "weights_mtime": [w.stat().st_mtime for w in weights]}

    def cached(m, s, d) -> bool:
        key_file = path[(m, s)].with_suffix(".key.json")
        return path[(m, s)].exists() and key_file.exists() and json.loads(key_file.read_text()) == json.loads(
            json.dumps(cache_key(d)))

    todo = [(m, s, d) for m, s, d in models if not cached(m, s, d)]
    timings = []
    if todo:
        # The engine binds every core of its node; hold that many CPUs (at most one node's worth,
        # eval.generation_cpus), or one GPU on a GPU cluster.
        cpus = p.cfg.eval.generation_cpus or min(float(ray.cluster_resources().get("CPU", 1)), float(os.cpu_count() or 1))
        actor = ray.remote(GenerationActor).options(num_cpus=max(1.0, cpus), num_gpus=1 if p.cfg.ray.use_gpu else 0,
                                                    runtime_env={"env_vars": worker_env()}).remote(
            p.cfg.eval.backend, seed=p.cfg.eval.seed)
        backend = ray.get(actor.backend.remote())
        log.info("generating %d models x %d prompts at temperatures %s (%d samples each above 0) with %s",
                 len(todo), len(ids), list(spec.temperatures), spec.samples_per_prompt, backend)
        for m, s, d in todo:
            rows, t = ray.get(actor.sample_model.remote(str(d), m, ids, prompts, spec))
            write_generations(rows, path[(m, s)])
            path[(m, s)].with_suffix(".key.json").write_text(json.dumps(cache_key(d)))
            timings.append(t)
            log.info("  %s%s: %d completions, %.0f tok/s, load %.1fs (%s)", m, "" if s < 0 else f" seed {s}",
                     len(rows), t["tokens_per_s"], t["load_seconds"], backend)
        ray.kill(actor)
    rows = []
    for m, s, _ in models:
        for r in read_generations(path[(m, s)]):
            r.update(method=m, seed=s)
            rows.append(r)
    return rows, timings


def judge_rows(p, rows: list[dict], methods: list[str]) -> dict:
    """Gold reward (testbed) and reward-model score of every row, then the per-temperature table."""
    from madpo_ray.eval import judge as J

    ids, prompts, docs = eval_prompts(p)
    ref_rows = [{"prompt_id": i, "text": d["reference"], "sample": 0} for i, d in zip(ids, docs)]
    reference: dict = {}
    if p.is_testbed:
        J.add_gold(rows, dict(zip(ids, docs)))
        J.add_gold(ref_rows, dict(zip(ids, docs)))
        reference["gold"] = {r["prompt_id"]: r["gold"] for r in ref_rows}
    rm_dir = p.stage_dir("reward") / "model"
    if rm_dir.exists():
        score = reward_model_scorer(str(rm_dir), str(p.stage_dir("sft") / "model"))
        J.add_reward_model(rows, dict(zip(ids, prompts)), score)
        J.add_reward_model(ref_rows, dict(zip(ids, prompts)), score)
        reference["rm"] = {r["prompt_id"]: r["rm"] for r in ref_rows}
    n_boot = p.cfg.eval.bootstrap_samples
    table = J.judge(rows, ids, baseline=SFT, reference=reference, n_boot=n_boot)
    column = "gold" if p.is_testbed else "rm"
    diffs = {m: J.difference(rows, "madpo", m, column, ids, n_boot) for m in methods if m not in ("madpo", SFT)} \
        if "madpo" in methods else {}
    return {"table": table, "madpo_minus": diffs, "column": column,
            "reference": {k: float(sum(v.values()) / len(v)) for k, v in reference.items()}}


def evaluate_models(p, models: list[tuple[str, Path]], out_dir: Path) -> dict:
    """`madpo eval`: the SFT policy and the given model folders, judged like `madpo compare`."""
    entries = [(SFT, -1, p.stage_dir("sft") / "model")] + [(label, -1, Path(d)) for label, d in models]
    rows, timings = generate_all(p, entries, Path(out_dir) / "generations")
    judged = judge_rows(p, rows, [label for label, _ in models])
    return write_report(p, Path(out_dir), judged, seeds=[-1], models={label: str(d) for label, d in models},
                        generation=timings)


def write_report(p, out_dir: Path, judged: dict, **extra) -> dict:
    """results.json, table.md and the plot, for `madpo compare` and `madpo eval` alike."""
    c = p.cfg
    results = {"tier": c.data.tier if p.is_testbed else None, "source": c.data.source,
               "temperatures": c.eval.temperatures, "prompts": len(eval_prompts(p)[0]),
               "samples_per_prompt": c.eval.samples_per_prompt, "backend": c.eval.backend, **extra, **judged}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(render_markdown(results))
    plot_comparison(results, out_dir / f"{judged['column']}_vs_temperature.png")
    return results


def reward_model_scorer(rm_dir: str, tokenizer_dir: str):
    from madpo_ray.eval.summary import reward_model_scores
    from madpo_ray.models import load_reward_model, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rm = load_reward_model(rm_dir, pad_token_id=tok.pad_token_id).eval()
    return lambda prompts, texts: reward_model_scores(rm, tok, prompts, texts, batch_size=64)


# --------------------------------------------------------------------------- reports
def render_markdown(results: dict) -> str:
    col = results["column"]
    name = {"gold": "gold reward (testbed)", "rm": "reward-model score"}[col]
    temps = results["temperatures"]
    lines = [f"# madpo compare: mean {name} by decoding temperature", "",
             f"source `{results['source']}`" + (f", data-quality tier **{results['tier']}**" if results["tier"] else "")
             + f"; {results['prompts']} held-out prompts; {results['samples_per_prompt']} samples per prompt at "
             f"temperature > 0 (1 greedy at 0); "
             + ("one model per row; 95% bootstrap CIs over prompts." if results["seeds"] == [-1] else
                f"training seeds {results['seeds']}; 95% bootstrap CIs over seeds and prompts."),
             ""]
    if col in results["reference"]:
        lines.append(f"Reference summaries score {results['reference'][col]:.3f}.")
        lines.append("")
    lines.append("| method | " + " | ".join(f"T={t:g}" for t in temps) + " |")
    lines.append("|---|" + "---|" * len(temps))
    by = {(r["method"], r["temperature"]): r for r in results["table"]}
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    best = {t: max((by[(m, t)][col]["mean"], m) for m in methods if m != SFT and (m, t) in by)[1] for t in temps}
    for m in methods:
        cells = []
        for t in temps:
            e = by.get((m, t))
            if e is None:
                cells.append("")
                continue
            s = f"{e[col]['mean']:.3f} [{e[col]['ci_low']:.2f}, {e[col]['ci_high']:.2f}]"
            cells.append(f"**{s}**" if best[t] == m else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    win = f"win_vs_{SFT}_{col}"
    if any(win in r for r in results["table"]):
        lines += ["", f"Win rate against the SFT policy (by {name}; sample j vs sample j of the same prompt):", "",
                  "| method | " + " | ".join(f"T={t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
        for m in methods:
            if m == SFT:
                continue
            lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)][win]['mean']:.3f}" if (m, t) in by and win in by[(m, t)]
                                                   else "" for t in temps) + " |")
    if results.get("madpo_minus"):
        lines += ["", f"MADPO minus each baseline ({name}, paired by prompt and seed, 95% CI):", "",
                  "| baseline | " + " | ".join(f"T={t:g}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
        for b, diffs in results["madpo_minus"].items():
            lines.append(f"| {b} | " + " | ".join(f"{d['mean']:+.3f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                                                  for d in diffs) + " |")
        ahead = [t for t in temps if best[t] == "madpo"]
        lines += ["", f"MADPO has the highest mean at {len(ahead)} of {len(temps)} temperatures"
                  + (f" ({', '.join(f'{t:g}' for t in ahead)})." if ahead else ".")]
    return "\n".join(lines) + "\n"


def plot_comparison(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = results["column"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    for i, m in enumerate(methods):
        rows = sorted((r for r in results["table"] if r["method"] == m), key=lambda r: r["temperature"])
        xs = [r["temperature"] + (i - len(methods) / 2) * 0.006 for r in rows]  # dodge the error bars
        ys = [r[col]["mean"] for r in rows]
        err = [[y - r[col]["ci_low"] for y, r in zip(ys, rows)], [r[col]["ci_high"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m, linestyle="--" if m == SFT else "-")
    if col in results["reference"]:
        ax.axhline(results["reference"][col], color="grey", linewidth=0.8, linestyle=":", label="reference")
    ax.set_xlabel("decoding temperature")
    ax.set_ylabel({"gold": "mean gold reward", "rm": "mean reward-model score"}[col])
    tier = f", tier {results['tier']}" if results.get("tier") else ""
    ax.set_title(f"{len(results['seeds'])} seeds x {results['prompts']} prompts{tier} (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
