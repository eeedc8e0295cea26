"""`madpo export RUN`: a trained model as a self-describing HF folder, ready for any model hub.

The folder is the stage's merged model (plus its LoRA adapter in `adapter/` when there is one)
and a model card, README.md, that says what produced it: the base model and its license, the
data, the loss and its parameters, the run's metrics, and the full config. It is written to a
temporary sibling and renamed into place, so a reader never sees half an export. An existing
folder is replaced only when an export wrote it (it carries io.OUTPUT_MARKER) or with --force.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import yaml

from madpo_ray.config import PipelineConfig, load_config
from madpo_ray.io import atomic_folder, check_output_folder, mark_output_folder
from madpo_ray.layout import RunLayout, is_testbed
from madpo_ray.models import check_model_folder, verify_weights

EXPORTABLE = ("sft", "reward", "policy")
CARD_METRICS = ("sft_greedy_gold_reward", "policy_greedy_gold_reward", "reference_gold_reward",
                "sft_preference_accuracy", "policy_preference_accuracy", "policy_implicit_reward_accuracy",
                "policy_implicit_margin_mean", "pairs")


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (`---` ... `---`), or {} (safe_load only: data, never code)."""
    if not readme.exists():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def base_license(cfg: PipelineConfig) -> str:
    """The base model's license: this project's own (Apache-2.0) for a model built from scratch,
    else what the base folder's card declares, else "other" (the card then says to check it)."""
    if cfg.model.name_or_path is None:
        return "apache-2.0"
    declared = read_front_matter(Path(cfg.model.name_or_path) / "README.md").get("license")
    return str(declared) if declared else "other"


# Files of a base model's folder that state its terms of use: an export of a model derived from it
# carries them (Gemma's terms require passing them on with the model and its derivatives).
TERMS_FILES = ("GEMMA_TERMS.html", "GEMMA_TERMS.md", "NOTICE.md", "NOTICE", "LICENSE", "LICENSE.md", "LICENSE.txt",
               "USE_POLICY.md")


def base_terms(cfg: PipelineConfig) -> list[Path]:
    """The terms files in the base model's folder (none for a hub name or the from-scratch model)."""
    if cfg.model.name_or_path is None or not Path(cfg.model.name_or_path).is_dir():
        return []
    return [Path(cfg.model.name_or_path) / n for n in TERMS_FILES if (Path(cfg.model.name_or_path) / n).is_file()]


def card_metrics(layout: RunLayout) -> dict:
    """The run summary's headline numbers (those the run has) and the validation split's RM agreement:
    development figures (the summary never reads the sealed test split)."""
    if not layout.summary_json.exists():
        return {}
    summary = json.loads(layout.summary_json.read_text())
    out = {k: summary[k] for k in CARD_METRICS if k in summary}
    validation = (summary.get("margins") or {}).get("validation") or {}
    for k in ("rm_accuracy_vs_labels", "rm_accuracy_vs_true_margin", "spearman_rm_vs_true"):
        if k in validation:
            out[f"validation_{k}"] = validation[k]
    return out


def model_card(cfg: PipelineConfig, layout: RunLayout, stage: str) -> str:
    loss = cfg.policy.loss
    params = loss.resolved()  # the values it trained with, defaults too
    license_ = base_license(cfg)
    front = {"license": license_, "library_name": "transformers",
             "tags": ["madpo-ray", "preference-optimization", loss.name if stage == "policy" else stage]}
    if cfg.model.name_or_path:
        front["base_model"] = str(cfg.model.name_or_path)
    what = {"sft": "the supervised fine-tuned policy (the reference policy of preference training)",
            "reward": (f"a reward ensemble of {cfg.reward.ensemble} linear heads on one backbone (Bradley-Terry, a "
                       f"{cfg.reward.ensemble}-label sequence classifier: each label is one head's reward; their "
                       "mean is the ensemble's reward, their spread its uncertainty)") if cfg.reward.ensemble
            else "the scalar reward model (Bradley-Terry, a 1-label sequence classifier)",
            "policy": f"the policy trained with the `{loss.name}` loss from the SFT model"}[stage]
    base = cfg.model.name_or_path or "a small Llama built from scratch by madpo-ray"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {cfg.name}: {stage}", "", f"This is {what}, exported from a madpo-ray run.", "",
             f"- **Base model:** {base} (license: {license_}"
             + ("; check the base model's own terms" if license_ == "other" else "") + ")",
             *([f"- **Terms of use:** this model is a derivative of its base model and comes with the base "
                f"model's terms, carried beside this card: {', '.join(f.name for f in base_terms(cfg))}"]
               if base_terms(cfg) else []),
             f"- **Data:** `{cfg.data.source}`" + (f", testbed tier `{cfg.data.tier}`" if is_testbed(cfg) else ""),
             f"- **LoRA:** {cfg.model.lora.model_dump() if cfg.model.lora else 'none (full fine-tuning)'}; "
             f"dtype {cfg.model.dtype}"]
    if stage == "policy":
        lines.append(f"- **Loss:** `{loss.name}` with " + ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                                                for k, v in params.items()))
    metrics = card_metrics(layout)
    if metrics:
        lines += ["", "## Metrics (the run summary, on the validation split)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Load it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"
              if stage != "reward" else "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              f"model = {'AutoModelForSequenceClassification' if stage == 'reward' else 'AutoModelForCausalLM'}"
              ".from_pretrained(\"PATH\")", "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", "",
              "## Config", "", "```yaml", cfg.to_yaml().strip(), "```", ""]
    return "\n".join(lines)


def refuse_links(folders: list[Path]) -> None:
    """An export is a self-contained copy: a symlink in a model folder would carry a pointer to a
    file elsewhere (or copy what it points to, which the run never wrote), so it is refused."""
    for folder in folders:
        links = [p for p in Path(folder).rglob("*") if p.is_symlink()]
        if links:
            raise ValueError(f"{folder} holds symbolic links ({', '.join(str(x) for x in links[:3])}): an export copies "
                             "only files the run wrote; replace the links with the files")


def export_run(run_dir: Path, stage: str = "policy", loss: Optional[str] = None, out: Optional[Path] = None,
               force: bool = False) -> Path:
    """Copy a run's stage model (merged weights, adapter, tokenizer) with a model card to `out`
    (default: <run>/export/<stage>[-<loss>]); returns the folder. An existing `out` is replaced only
    when an earlier export wrote it (or `force`): see io.check_output_folder."""
    if stage not in EXPORTABLE:
        raise ValueError(f"--stage {stage!r}: choose one of {', '.join(EXPORTABLE)}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if loss:
        cfg = cfg.derive({"policy.loss": cfg.policy.loss.switched_to(loss)})
    layout = RunLayout(run_dir, cfg.policy.loss.name)
    source = layout.model_dir(stage)
    check_model_folder(str(source))
    verify_weights(source)
    out = Path(out) if out else run_dir / "export" / (f"policy-{cfg.policy.loss.name}" if stage == "policy" else stage)
    check_output_folder(out, force)
    sources = [source] + ([layout.adapter_dir(stage)] if layout.adapter_dir(stage).exists() else [])
    refuse_links(sources)
    with atomic_folder(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if len(sources) > 1:
            shutil.copytree(sources[1], tmp / "adapter")
        (tmp / "README.md").write_text(model_card(cfg, layout, stage))
        for terms in base_terms(cfg):
            shutil.copyfile(terms, tmp / terms.name)
        mark_output_folder(tmp, "madpo export")
    return out
