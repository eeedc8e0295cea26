"""Greedy summaries of a testbed run's first validation documents, side by side: the reference,
the base model zero-shot, the SFT policy and the trained policy, as a markdown table (what the
README shows for a real pretrained model). Validation documents only: the sealed test split is
for `madpo compare --final`.

    python bench/summaries.py runs/gemma3-270m [--n 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from madpo_ray.config import load_config
from madpo_ray.console import quiet_libraries
from madpo_ray.data.prompts import generation_prompts
from madpo_ray.generation import generate_transformers
from madpo_ray.io import read_jsonl
from madpo_ray.layout import DEVELOPMENT_SPLIT, RunLayout
from madpo_ray.models import load_causal_lm, load_tokenizer


def greedy(model_dir: str, prompts_of, n_tokens: int, max_prompt: int) -> list[str]:
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    return [text for text, _ in generate_transformers(model, tok, prompts_of(tok), temperature=0.0,
                                                      max_new_tokens=n_tokens, max_prompt_length=max_prompt)]


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    quiet_libraries()
    cfg = load_config(args.run / "config.yaml")
    lay = RunLayout.of(cfg.derive({"runs_dir": str(args.run.parent), "name": args.run.name}))
    docs = read_jsonl(lay.docs_path(DEVELOPMENT_SPLIT))[:args.n]

    def prompts_of(tok):
        return generation_prompts(cfg.data, tok, [d["document"] for d in docs])

    models = {"base, zero-shot": cfg.model.name_or_path or str(lay.base_dir), "SFT": str(lay.model_dir("sft")),
              f"SFT + {cfg.policy.loss.name}": str(lay.model_dir("policy"))}
    columns = {name: greedy(d, prompts_of, cfg.eval.max_new_tokens, cfg.data.max_prompt_length)
               for name, d in models.items()}
    print("| document | reference | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for i, d in enumerate(docs):
        print(f"| {d['doc_id']} | {cell(d['reference'])} | " + " | ".join(cell(c[i]) for c in columns.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
