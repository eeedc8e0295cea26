"""Scoring pass: Ray Data `map_batches` over an actor pool holding the frozen reference (SFT)
model and the reward model. Writes, per pair, reference log-probs (summed and per-token mean,
with lengths) and reward margins, so policy training needs neither model in memory.

`score_examples` is the plain function the actors call; tests and the single-process
benchmark baseline call it directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from madpo_ray.data.margins import margin_diagnostics
from madpo_ray.engine.collectives import all_gather_objects
from madpo_ray.engine.loop import autocast_context
from madpo_ray.io import atomic_folder
from madpo_ray.layout import SEALED_SPLIT
from madpo_ray.models import load_causal_lm, load_reward_model, load_tokenizer
from madpo_ray.pair_forward import pair_collator, pair_response_logprobs, pair_rewards

log = logging.getLogger(__name__)
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class ComputePolicy:
    """How scoring computes, the same as policy training: models loaded in the run's dtype, the
    policy's autocast, the same pair layout. So the stored reference log-probs equal the policy's
    own at step 0."""

    dtype: str = "float32"
    bf16: str = "off"  # OptimConfig.bf16 of the policy stage: "auto" | "on" | "off"
    pair_forward: str = "two_sequence"  # ModelConfig.pair_forward

    @classmethod
    def of(cls, cfg) -> "ComputePolicy":
        return cls(cfg.model.dtype, cfg.policy.optim.bf16, cfg.model.pair_forward)

    def autocast(self, device: torch.device = torch.device("cpu")):
        return autocast_context(device, self.bf16)


@torch.no_grad()
def score_examples(ref_model, reward_model, examples: list[dict], pad_token_id: int,
                   precision: ComputePolicy = ComputePolicy()) -> list[dict]:
    """Reference log-probs and reward margins of tokenised pairs, one batch (both models frozen).
    Without a reward model (score.margins_from=data) each pair keeps its own `margin`."""
    batch = pair_collator(ref_model, pad_token_id, precision.pair_forward)(examples)
    with precision.autocast():
        chosen, rejected = pair_response_logprobs(ref_model, batch)
        rewards = pair_rewards(reward_model, batch) if reward_model is not None else None
    out = []
    for i, ex in enumerate(examples):
        row = dict(ex)
        row.update(
            ref_logp_chosen=float(chosen.summed[i]), ref_logp_rejected=float(rejected.summed[i]),
            ref_logp_mean_chosen=float(chosen.mean[i]), ref_logp_mean_rejected=float(rejected.mean[i]),
            len_chosen=float(chosen.n_tokens[i]), len_rejected=float(rejected.n_tokens[i]),
        )
        if rewards is not None:
            row.update(reward_columns(rewards[0][i], rewards[1][i]))
        out.append(row)
    return out


def reward_columns(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """A pair's reward-model columns. An ensemble's heads ([K] scores each) give the mean reward,
    the mean margin and the heads' standard deviation of the margin (margin_std: its uncertainty)."""
    if chosen.dim() == 0:
        return {"reward_chosen": float(chosen), "reward_rejected": float(rejected), "margin": float(chosen - rejected)}
    margins = (chosen - rejected).double()
    return {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
            "margin": float(margins.mean()), "margin_std": float(margins.std())}


class PairScorer:
    """Ray Data actor (or a plain object, locally): loads both frozen models once, in the run's
    dtype, and scores batches of tokenised pairs."""

    def __init__(self, ref_dir: str, reward_dir: Optional[str], threads: int = 1,
                 precision: ComputePolicy = ComputePolicy()):
        torch.set_num_threads(threads)
        self.precision = precision
        self.tokenizer = load_tokenizer(ref_dir)
        self.ref = load_causal_lm(ref_dir, precision.dtype).eval()
        self.rm = None if reward_dir is None else load_reward_model(
            reward_dir, precision.dtype, pad_token_id=self.tokenizer.pad_token_id).eval()

    def score(self, rows: list[dict]) -> list[dict]:
        return score_examples(self.ref, self.rm, rows, self.tokenizer.pad_token_id, self.precision)

    def __call__(self, batch):
        import pandas as pd

        rows = batch.to_dict("records")
        for r in rows:
            for c in ID_COLUMNS:
                r[c] = [int(t) for t in r[c]]
        return pd.DataFrame(self.score(rows))


def score_with_ray(examples: list[dict], ref_dir: Path, reward_dir: Optional[Path], out_dir: Path, *,
                   batch_size: int = 32, num_actors: int = 2, cpus_per_actor: float = 1.0,
                   partition_col: str = "split", precision: ComputePolicy = ComputePolicy()) -> Path:
    """Score `examples` (tokenised pairs plus metadata) into parquet under out_dir.

    One Dataset for every split (the actors load their models once), written partitioned by
    `partition_col`: out_dir/split=train/, out_dir/split=eval/.
    """
    import ray.data

    # ~4 batches per block: enough blocks to keep every actor busy, few enough to avoid overhead.
    blocks = max(num_actors, len(examples) // (4 * batch_size))
    ds = ray.data.from_items(examples, override_num_blocks=blocks)
    ds = ds.map_batches(PairScorer, fn_constructor_kwargs={"ref_dir": str(ref_dir),
                                                           "reward_dir": str(reward_dir) if reward_dir else None,
                                                           "threads": max(1, int(cpus_per_actor)),
                                                           "precision": precision},
                        batch_size=batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor)
    with atomic_folder(out_dir) as tmp:  # readers never see a half-written folder
        ds.write_parquet(str(tmp), partition_cols=[partition_col])
    return out_dir


def score_locally(examples: list[dict], ref_dir: Path, reward_dir: Optional[Path], out_dir: Path, *,
                  batch_size: int = 32,
                  partition_col: str = "split", precision: ComputePolicy = ComputePolicy()) -> Path:
    """The same scoring in this process (ray.backend=local), written in the same partitioned layout."""
    import os

    scorer = PairScorer(str(ref_dir), str(reward_dir) if reward_dir else None, threads=max(1, os.cpu_count() or 1),
                        precision=precision)
    rows = [r for i in range(0, len(examples), batch_size) for r in scorer.score(examples[i:i + batch_size])]
    return write_scored(rows, out_dir, partition_col)


def score_shard(examples: list[dict], ref_dir: str, reward_dir: Optional[str], out_dir: str, *, rank: int,
                world_size: int, threads: int = 1, batch_size: int = 32,
                precision: ComputePolicy = ComputePolicy()) -> None:
    """The scoring in the run's Ray Train workers (score.backend=workers): each worker scores every
    world_size-th pair, and rank 0 gathers them back in order and writes the parquet. The
    workers are up already, so this pays no actor start and no CPUs change hands."""
    scorer = PairScorer(ref_dir, reward_dir, threads=threads, precision=precision)
    mine = examples[rank::world_size]
    rows = [r for i in range(0, len(mine), batch_size) for r in scorer.score(mine[i:i + batch_size])]
    parts = all_gather_objects(rows, world_size)
    if rank == 0:
        write_scored(interleaved(parts), Path(out_dir))


def interleaved(parts: list[list]) -> list:
    """The rows of `parts[r] = rows[r::len(parts)]`, back in their order."""
    n = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(n)]


def write_scored(rows: list[dict], out_dir: Path, partition_col: str = "split") -> Path:
    """Scored rows as parquet partitioned like Ray Data writes them: out_dir/split=<name>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_folder(out_dir) as tmp:
        for value in dict.fromkeys(r[partition_col] for r in rows):
            part = [{k: v for k, v in r.items() if k != partition_col} for r in rows if r[partition_col] == value]
            (tmp / f"{partition_col}={value}").mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(part), tmp / f"{partition_col}={value}" / "part-0.parquet")
    return out_dir


SCORING_BACKENDS = {"local": "a plain loop in this process", "workers": "the run's Ray Train workers",
                    "ray_data": "Ray Data"}


def scoring_backend(cfg, pairs: int) -> str:
    """"workers", "ray_data" or "local" for score.backend (see ScoreConfig)."""
    if cfg.ray.backend == "local" or cfg.score.backend == "local":
        return "local"
    if cfg.score.backend != "auto":
        return cfg.score.backend
    return "workers" if cfg.ray.address or pairs >= cfg.score.parallel_min_pairs else "local"


def score_splits(layout, tokenized: dict[str, tuple[list[dict], dict]], cfg,
                 in_workers: Optional[Callable[..., Path]] = None) -> dict:
    """The score stage: every split's tokenised pairs scored in one pass (in this process, in the
    run's Ray Train workers through `in_workers(examples, ref_dir, reward_dir, out_dir)`, or by
    Ray Data), then checks and the reward model's agreement with the labels (and, on the
    testbed, with the true margins)."""
    import time

    from_data = cfg.score.margins_from == "data"
    examples, metrics = [], {"margins_from": cfg.score.margins_from}
    for split, (exs, report) in tokenized.items():
        for ex in exs:
            if not from_data:
                ex.pop("margin", None)  # the reward model's margin replaces any given one
                ex.pop("margin_std", None)  # and a given uncertainty no longer belongs to it
            ex["split"] = split
        examples += exs
        metrics[split] = {"tokenize": report}
    t0 = time.time()
    models = (layout.model_dir("sft"), None if from_data else layout.model_dir("reward"), layout.scored_dir)
    backend = scoring_backend(cfg, len(examples))
    metrics["backend"] = backend
    log.info("scoring %d pairs with %s", len(examples), SCORING_BACKENDS[backend])
    if backend == "local":
        out = score_locally(examples, *models, batch_size=cfg.score.batch_size, precision=ComputePolicy.of(cfg))
    elif backend == "workers":
        if in_workers is None:
            raise ValueError("score.backend=workers scores in a pipeline run's Ray Train workers; here there are none")
        out = in_workers(examples, *models)
    else:
        out = score_with_ray(examples, *models, batch_size=cfg.score.batch_size, num_actors=cfg.score.num_actors,
                             precision=ComputePolicy.of(cfg))
    secs = time.time() - t0
    metrics.update(pairs=len(examples), seconds=secs, pairs_per_s=len(examples) / max(secs, 1e-9))
    for split in tokenized:
        rows = read_partition(out, split)
        assert_no_nan(rows, f"{out}/split={split}")
        metrics[split]["scored"] = len(rows)
        if split != SEALED_SPLIT:  # the sealed split's agreement is a final step's figure, not the stage's
            # At MADPO's default weighting: the run summary repeats this with the run's own loss parameters.
            metrics[split].update(margin_diagnostics(rows))
    return metrics


def read_partition(out_dir: Path, value: str, partition_col: str = "split") -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(Path(out_dir) / f"{partition_col}={value}")).to_pylist()


def assert_no_nan(rows: list[dict], source: str) -> None:
    bad = [r.get("row_id") for r in rows
           if any(isinstance(v, float) and not math.isfinite(v) for v in r.values())]
    if bad:
        raise ValueError(f"{source}: non-finite scores in rows {bad[:10]} ({len(bad)} total)")
