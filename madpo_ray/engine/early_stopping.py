"""Early stopping on a held-out metric: patience over evaluations and the best weights seen,
checkpointed with the training so a resumed run decides and restores the same."""

from __future__ import annotations

import math
from typing import Optional

import torch

from madpo_ray.engine.parallel import local_tree, reshard


MONITOR = "eval_loss"  # what early stopping watches in the held-out metrics; lower is better


class EarlyStopping:
    """Patience over held-out evaluations, and the best weights seen. `update(value)` returns
    (improved, stop): improved when the value is finite and strictly below the best so far; stop
    once `patience` evaluations in a row have not improved. Only trainable parameters are kept
    (the others never change; with LoRA that is a few MB), on the CPU. Its state_dict, best
    weights included, goes into checkpoints, so a resumed run decides and restores the same."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad = 0  # evaluations in a row without improvement
        self.history: list[dict] = []  # {"step", **held-out metrics} per evaluation
        self.weights: dict[str, torch.Tensor] = {}

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience

    def update(self, value: float, step: Optional[int] = None) -> tuple[bool, bool]:
        improved = math.isfinite(value) and (self.best is None or value < self.best)
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return improved, self.stopped

    def keep(self, model: torch.nn.Module) -> None:
        """This worker's copy (of a sharded model: its shards) of the trainable weights."""
        reshard(model)
        self.weights = {n: local_tree(p.detach()).to("cpu", copy=True)
                        for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model: torch.nn.Module) -> None:
        reshard(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                local_tree(params[name]).copy_(value)

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_eval_loss": self.best, "stopped_early": self.stopped,
                "eval_history": [dict(h) for h in self.history]}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "history": self.history,
                "weights": self.weights}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_step, self.bad = d["best"], d["best_step"], int(d["bad"])
        self.history, self.weights = [dict(h) for h in d["history"]], dict(d["weights"])
