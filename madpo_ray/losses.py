"""Preference losses as pure tensor functions, registered by name.

Every loss returns *per-example* values and owns its contract: the registry entry
(`PolicyLoss`) knows the parameters the loss takes (its keyword arguments and their
defaults, so a misspelt or irrelevant parameter is an error that names it), whether it needs
reward-model margins, what training state it keeps, what it decides once per optimiser step
over the whole step's pairs (a step plan: beta-DPO's filter and beta), and how its per-example
values reduce to the scalar the optimiser sees, across micro-batches and data-parallel workers
included. The training step is then the same for every loss. Nothing here knows about Ray,
models or data loaders, so each formula is unit-testable against hand-computed values.
Formulas follow ../shared/docs/madpo-spec.md exactly.

Notation: for pair i, ``h_i = [logp(y_w) - ref_logp(y_w)] - [logp(y_l) - ref_logp(y_l)]``
(token-summed response log-probs), ``m_i`` the frozen reward model's margin
``r(x, y_w) - r(x, y_l)``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

DEFAULT_TAU = math.log(999.0)  # margin at which the reward model is 99.9% sure


# --------------------------------------------------------------------------- inputs / outputs
@dataclass
class PolicyLossInputs:
    """Sequence log-probs of one batch of pairs, each a 1-D tensor of shape [B]."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: Optional[torch.Tensor] = None  # response token counts, needed by IPO
    rejected_lengths: Optional[torch.Tensor] = None
    margins: Optional[torch.Tensor] = None  # reward-model margins, needed by MADPO
    margin_stds: Optional[torch.Tensor] = None  # their uncertainty (an ensemble's spread), needed by madpo_expected

    def __post_init__(self) -> None:
        shape = self.policy_chosen_logps.shape
        for name in ("policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                     "chosen_lengths", "rejected_lengths", "margins", "margin_stds"):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                # A [B] vs [B, 1] mix would silently broadcast to [B, B]: refuse it here.
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if len(shape) != 1:
            raise ValueError(f"log-probs must be 1-D [B], got shape {tuple(shape)}")

    def implicit_margin(self) -> torch.Tensor:
        """h = chosen log-ratio minus rejected log-ratio (the DPO implicit reward margin)."""
        return (self.policy_chosen_logps - self.ref_chosen_logps) - (
            self.policy_rejected_logps - self.ref_rejected_logps
        )


@dataclass
class LossOutput:
    """Per-example losses plus a 0/1 mask of which examples count in the mean.

    A loss planned over a whole optimiser step (beta-DPO) also says what the step's mean divides
    by: the kept count over all its micro-batches and workers, and how many micro-batches share it."""

    losses: torch.Tensor  # [B]
    keep: torch.Tensor  # [B] float, 1 for examples in the reduction (beta-DPO filters some)
    metrics: dict[str, float] = field(default_factory=dict)
    kept_total: Optional[float] = None  # kept over the whole step; None: gather this batch's keep
    micro_batches: int = 1  # micro-batches of the step this batch is one of


Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(local: torch.Tensor) -> torch.Tensor:
    return local


@dataclass(frozen=True)
class DataParallel:
    """How a loss sees the other data-parallel workers: its rank, their number, and an
    all-gather of equal-sized 1-D tensors (identity on one worker)."""

    rank: int = 0
    world_size: int = 1
    gather: Gather = no_gather


# --------------------------------------------------------------------------- reductions
def mean_reduction(out: LossOutput, dp: DataParallel) -> torch.Tensor:
    """Plain mean over the local batch; DDP's gradient average makes it the global mean
    (MADPO's weights are inside `losses`, not here)."""
    return out.losses.mean()


def kept_global_mean_reduction(out: LossOutput, dp: DataParallel) -> torch.Tensor:
    """Mean over the examples kept on *every* worker and in every micro-batch of the step: each
    micro-batch divides its kept sum by the step's kept count, times world size and micro-batches,
    which DDP's gradient average and the loop's `loss / accum` divide out again. Without a step
    plan the batch is the step, and the kept count is gathered from the workers here."""
    kept = out.kept_total if out.kept_total is not None else float(dp.gather(out.keep).sum())
    return (out.losses * out.keep).sum() * (dp.world_size * out.micro_batches / max(kept, 1.0))


Reduction = Callable[[LossOutput, DataParallel], torch.Tensor]


# --------------------------------------------------------------------------- step plans
@dataclass(frozen=True)
class StepShare:
    """One micro-batch's part of a step plan: its keep mask, the step's beta, and what the
    reduction divides by (the kept count over the whole step and its number of micro-batches)."""

    keep: torch.Tensor  # [B] float 0/1
    beta: float
    kept_total: float
    micro_batches: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepPlan:
    """What a loss decides once per optimiser step from the whole step's pairs (every micro-batch
    on every worker, in step order): which pairs count, and the step's beta."""

    keep: torch.Tensor  # [N] float 0/1 over the step's pairs
    beta: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    def share(self, index: torch.Tensor, micro_batches: int) -> StepShare:
        """The plan for the step positions `index` (one micro-batch of one worker)."""
        return StepShare(self.keep[index], self.beta, float(self.keep.sum()), micro_batches, self.metrics)


PlanStep = Callable[..., StepPlan]  # (h of the whole step, state, *, generator, **params) -> StepPlan


# --------------------------------------------------------------------------- registry
class LossParameterError(ValueError):
    """A parameter the loss does not take (misspelt, or belonging to another loss)."""


RUNTIME_ARGS = frozenset({"state", "generator", "dp", "share"})  # supplied by the training step, not the config


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss and its contract. Call it like the function: `loss(inputs, beta=0.1)`."""

    name: str
    fn: Callable[..., LossOutput]
    params: Mapping[str, Any]  # config parameters and their defaults, read from fn's signature
    runtime: frozenset  # which of RUNTIME_ARGS fn takes
    needs_margins: bool = False
    needs_margin_stds: bool = False  # the scored `margin_std` column (the margin's uncertainty)
    reduce: Reduction = mean_reduction
    make_state: Optional[Callable[[], Any]] = None  # training state that checkpoints must keep
    # Decisions taken once per optimiser step over the whole step's pairs (beta-DPO's filter and
    # beta); the training step then passes each micro-batch its `share` of the plan.
    plan_step: Optional[PlanStep] = None

    def check_params(self, given: Mapping[str, Any]) -> None:
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise LossParameterError(f"loss {self.name!r} takes no parameter(s) {unknown}; "
                                     f"its parameters are {sorted(self.params)}")

    def __call__(self, inputs: PolicyLossInputs, **kwargs) -> LossOutput:
        runtime = {k: kwargs.pop(k) for k in list(kwargs) if k in self.runtime}
        self.check_params(kwargs)
        if self.needs_margins and inputs.margins is None:
            raise ValueError(f"{self.name} needs reward-model margins (the scored 'margin' column)")
        if self.needs_margin_stds and inputs.margin_stds is None:
            raise ValueError(f"{self.name} needs each margin's uncertainty (the scored 'margin_std' column: a "
                             "reward ensemble's spread, or the dataset's own margin_std with --margins-from data)")
        return self.fn(inputs, **kwargs, **runtime)

    def plan(self, margins: torch.Tensor, state: Any, *, generator: Optional[torch.Generator] = None,
             **kwargs) -> StepPlan:
        """The step plan from the implicit margins h of the whole step (detached, step order)."""
        if self.plan_step is None:
            raise ValueError(f"loss {self.name!r} takes no step plan")
        self.check_params(kwargs)
        return self.plan_step(margins, state, generator=generator, **kwargs)


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def declared_params(fn: Callable) -> tuple[dict[str, Any], frozenset]:
    """A loss's keyword-only arguments: config parameters (with defaults) and runtime inputs."""
    params, runtime = {}, set()
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name in RUNTIME_ARGS:
            runtime.add(p.name)
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"loss parameter {p.name!r} of {fn.__name__} needs a default")
        else:
            params[p.name] = p.default
    return params, frozenset(runtime)


def register_policy_loss(name: str, *, needs_margins: bool = False, needs_margin_stds: bool = False,
                         reduce: Reduction = mean_reduction, make_state: Optional[Callable[[], Any]] = None,
                         plan_step: Optional[PlanStep] = None):
    def wrap(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} registered twice")
        params, runtime = declared_params(fn)
        if plan_step is not None and set(declared_params(plan_step)[0]) != set(params):
            raise TypeError(f"the step plan of {name!r} must take the loss's parameters {sorted(params)}")
        POLICY_LOSSES[name] = PolicyLoss(name, fn, params, runtime, needs_margins, needs_margin_stds, reduce,
                                         make_state, plan_step)
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered: {sorted(POLICY_LOSSES)}") from None


def all_loss_params() -> set[str]:
    """Every parameter some registered loss takes (what LossConfig must offer)."""
    return {k for loss in POLICY_LOSSES.values() for k in loss.params}


# --------------------------------------------------------------------------- reward model
def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r(x, y_w) - r(x, y_l)), per pair."""
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(f"reward shapes differ: {tuple(reward_chosen.shape)} vs {tuple(reward_rejected.shape)}")
    return -F.logsigmoid(reward_chosen - reward_rejected)


# --------------------------------------------------------------------------- DPO / IPO
def dpo_per_example(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    logits = beta * h
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


@register_policy_loss("dpo")
def dpo_loss(inputs: PolicyLossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    h = inputs.implicit_margin()
    losses = dpo_per_example(h, beta, label_smoothing)
    return LossOutput(losses, torch.ones_like(losses))


@register_policy_loss("ipo")
def ipo_loss(inputs: PolicyLossInputs, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised IPO: (h_ipo - 1/(2 beta))^2 with per-token average log-ratios."""
    if inputs.chosen_lengths is None or inputs.rejected_lengths is None:
        raise ValueError("ipo needs chosen_lengths and rejected_lengths (response token counts)")
    chosen = (inputs.policy_chosen_logps - inputs.ref_chosen_logps) / inputs.chosen_lengths.clamp_min(1)
    rejected = (inputs.policy_rejected_logps - inputs.ref_rejected_logps) / inputs.rejected_lengths.clamp_min(1)
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, torch.ones_like(losses))


# --------------------------------------------------------------------------- MADPO
def madpo_scale(abs_margin: torch.Tensor, c_max: float = 4.0, lam: float = 1.0,
                tau: float = DEFAULT_TAU) -> torch.Tensor:
    """c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau))); c(tau) = 1 exactly."""
    if not c_max > 1.0:
        raise ValueError(f"c_max must be > 1 (c_min = 1/c_max), got {c_max}")
    c_min = 1.0 / c_max
    k = (c_max - 1.0) / (1.0 - c_min)
    # exp overflows to inf for huge margins, which correctly drives c to c_min.
    return c_min + (c_max - c_min) / (1.0 + k * torch.exp(lam * (abs_margin - tau)))


def madpo_weights(margin: torch.Tensor, c_max: float = 4.0, lam: float = 1.0, tau: float = DEFAULT_TAU,
                  mode: str = "both") -> torch.Tensor:
    """w(m) = sigmoid(c(|m|) m) / sigmoid(m) for m > -tau, else 1. Detached; 0 < w < 2.

    mode: "both" (MADPO), "amplify" (c' = max(c, 1)) or "regularize" (c' = min(c, 1)).
    """
    margin = margin.detach()
    if not margin.is_floating_point():
        margin = margin.float()
    c = madpo_scale(margin.abs(), c_max, lam, tau)
    if mode == "amplify":
        c = c.clamp_min(1.0)
    elif mode == "regularize":
        c = c.clamp_max(1.0)
    elif mode != "both":
        raise ValueError(f"mode must be 'both', 'amplify' or 'regularize', got {mode!r}")
    # The ratio of sigmoids in log space stays finite for any finite margin.
    w = torch.exp(F.logsigmoid(c * margin) - F.logsigmoid(margin))
    return torch.where(margin <= -tau, torch.ones_like(w), w)


def weighted_dpo(inputs: PolicyLossInputs, mode: str, beta: float, c_max: float, lam: float,
                 tau: float) -> LossOutput:
    """MADPO and its ablations: w(m) (detached) times the DPO loss of each pair."""
    w = madpo_weights(inputs.margins, c_max, lam, tau, mode).to(inputs.policy_chosen_logps.dtype)
    losses = w * dpo_per_example(inputs.implicit_margin(), beta)
    return LossOutput(losses, torch.ones_like(losses), {"weight_mean": float(w.mean()),
                                                        "weight_min": float(w.min()),
                                                        "weight_max": float(w.max())})


@register_policy_loss("madpo", needs_margins=True)
def madpo_loss(inputs: PolicyLossInputs, *, beta: float = 0.1, c_max: float = 4.0, lam: float = 1.0,
               tau: float = DEFAULT_TAU) -> LossOutput:
    return weighted_dpo(inputs, "both", beta, c_max, lam, tau)


@register_policy_loss("madpo_amplify", needs_margins=True)
def madpo_amplify_loss(inputs: PolicyLossInputs, *, beta: float = 0.1, c_max: float = 4.0, lam: float = 1.0,
                       tau: float = DEFAULT_TAU) -> LossOutput:
    """Ablation: only amplify hard pairs, c' = max(c, 1)."""
    return weighted_dpo(inputs, "amplify", beta, c_max, lam, tau)


@register_policy_loss("madpo_regularize", needs_margins=True)
def madpo_regularize_loss(inputs: PolicyLossInputs, *, beta: float = 0.1, c_max: float = 4.0, lam: float = 1.0,
                          tau: float = DEFAULT_TAU) -> LossOutput:
    """Ablation: only damp easy pairs, c' = min(c, 1)."""
    return weighted_dpo(inputs, "regularize", beta, c_max, lam, tau)


# --------------------------------------------------------------------------- MADPO under margin uncertainty
QUADRATURE_NODES = 64  # Gauss-Legendre nodes over the smooth part of the weight (above -tau)
TAIL_Z = 8.0  # standard deviations: the normal's mass beyond is below 1e-15


def expected_madpo_weights(margin: torch.Tensor, margin_std: torch.Tensor, c_max: float = 4.0, lam: float = 1.0,
                           tau: float = DEFAULT_TAU, nodes: int = QUADRATURE_NODES) -> torch.Tensor:
    """E[w(M)] for M ~ N(margin, margin_std^2): MADPO's weight averaged over what the margin may
    truly be. Detached; 0 < w < 2; w(margin) itself where the std is 0.

        E[w(M)] = P(M <= -tau) * 1 + integral over z > z* of w(margin + std z) phi(z) dz,
        z* = (-tau - margin) / std,

    the first term exact (the normal's CDF), the second by Gauss-Legendre quadrature on [z*, 8]: w
    jumps at -tau, so the integral is split there rather than smoothed over by one rule.

    Why: w is non-monotone in m (near 0 for moderately contradicted pairs, 1 below -tau), so a point
    estimate near those edges moves a pair between "dropped" and "full weight" on a small error.
    Averaging over the margin's uncertainty (the reward model's estimate and its spread as the
    posterior, a flat prior) turns that cliff into a ramp as wide as the uncertainty."""
    import numpy as np

    margin, std = margin.detach().double(), margin_std.detach().double().clamp_min(0.0)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    z_lo = ((-tau - margin) / safe).clamp(-TAIL_Z, TAIL_Z)
    x, a = (torch.as_tensor(v, dtype=torch.float64, device=margin.device) for v in np.polynomial.legendre.leggauss(nodes))
    half = (TAIL_Z - z_lo)[:, None] / 2
    z = z_lo[:, None] + half * (x[None, :] + 1)  # [B, nodes] on [z*, 8]
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    w = madpo_weights((margin[:, None] + safe[:, None] * z).reshape(-1), c_max, lam, tau).double().reshape(z.shape)
    above = (half * a[None, :] * density * w).sum(-1)
    below = 0.5 * (1 + torch.erf(z_lo / math.sqrt(2)))
    return torch.where(std > 0, below + above, madpo_weights(margin, c_max, lam, tau).double())


@register_policy_loss("madpo_expected", needs_margins=True, needs_margin_stds=True)
def madpo_expected_loss(inputs: PolicyLossInputs, *, beta: float = 0.1, c_max: float = 4.0, lam: float = 1.0,
                        tau: float = DEFAULT_TAU) -> LossOutput:
    """MADPO with each pair's weight averaged over its margin's uncertainty (expected_madpo_weights);
    plain MADPO where the margins are certain."""
    w = expected_madpo_weights(inputs.margins, inputs.margin_stds, c_max, lam, tau).to(inputs.policy_chosen_logps.dtype)
    losses = w * dpo_per_example(inputs.implicit_margin(), beta)
    return LossOutput(losses, torch.ones_like(losses), {"weight_mean": float(w.mean()), "weight_min": float(w.min()),
                                                        "weight_max": float(w.max())})


# --------------------------------------------------------------------------- beta-DPO
@dataclass
class BetaDPOState:
    """Moving averages of the implicit margin; must survive checkpoints and agree across workers."""

    mu: float = 0.0
    sigma: float = 0.0
    steps: int = 0

    def state_dict(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.mu, self.sigma, self.steps = float(d["mu"]), float(d["sigma"]), int(d["steps"])


def gaussian_filter(a: torch.Tensor, mu: float, sigma: float, rho: float,
                    generator: Optional[torch.Generator]) -> torch.Tensor:
    """0/1 mask keeping int(N (1 - rho)) of the N pairs, drawn without replacement with
    probability proportional to exp(-0.5 ((A - mu) / sigma)^2): pairs far from the running
    mean (outliers, trivially easy or hopeless) are the ones dropped."""
    n = a.numel()
    p = torch.exp(-0.5 * ((a - mu) / max(sigma, 1e-8)) ** 2)
    if float(p.sum()) <= 0 or not torch.isfinite(p).all():
        p = torch.ones_like(p)  # every margin is far out: fall back to a uniform draw
    kept_idx = torch.multinomial(p, max(1, int(n * (1 - rho))), replacement=False, generator=generator)
    keep = torch.zeros(n, dtype=torch.float64)
    keep[kept_idx] = 1.0
    return keep


def beta_dpo_plan(a: torch.Tensor, state: Optional[BetaDPOState], *, beta: float = 0.1, alpha: float = 0.6,
                  rho: float = 0.2, momentum: float = 0.9, generator: Optional[torch.Generator] = None) -> StepPlan:
    """beta-DPO's once-per-step decisions over A, the detached implicit margins of the whole
    optimiser step (every micro-batch, every worker): the moving averages are updated first
    (once per step, in place), the Gaussian filter is drawn once (every worker seeding
    `generator` alike draws alike), and beta_batch comes from the kept pairs' mean."""
    if state is None:
        raise ValueError("beta_dpo needs a BetaDPOState (its moving averages are training state)")
    a = a.detach().to("cpu", torch.float64)
    state.mu = momentum * state.mu + (1 - momentum) * float(a.mean())
    state.sigma = momentum * state.sigma + (1 - momentum) * (float(a.std()) if a.numel() > 1 else 0.0)
    state.steps += 1
    keep = gaussian_filter(a, state.mu, state.sigma, rho, generator)
    kept_mean = float(a[keep.bool()].mean())
    beta_batch = max(beta * (1 + alpha * (kept_mean - state.mu)), 1e-3)
    return StepPlan(keep, beta_batch, {"beta_batch": beta_batch, "beta_mu": state.mu, "beta_sigma": state.sigma,
                                       "beta_kept_share": float(keep.mean())})


@register_policy_loss("beta_dpo", reduce=kept_global_mean_reduction, make_state=BetaDPOState, plan_step=beta_dpo_plan)
def beta_dpo_loss(inputs: PolicyLossInputs, *, state: Optional[BetaDPOState] = None, beta: float = 0.1,
                  alpha: float = 0.6, rho: float = 0.2, momentum: float = 0.9,
                  generator: Optional[torch.Generator] = None, dp: DataParallel = DataParallel(),
                  share: Optional[StepShare] = None) -> LossOutput:
    """beta-DPO (Wu et al. 2024): -log sigmoid(beta_batch h) over the pairs the step keeps.

    In training, `share` is this micro-batch's part of the plan `beta_dpo_plan` made over the
    whole optimiser step, and nothing is updated here. Without it, this batch is the step: A is
    all-gathered over workers by `dp.gather` (each worker's batch the same size), planned here
    (`state` updated in place) and each worker keeps its own slice.
    """
    h = inputs.implicit_margin()
    if share is None:
        local = h.detach().float()
        plan = beta_dpo_plan(dp.gather(local), state, beta=beta, alpha=alpha, rho=rho, momentum=momentum,
                             generator=generator)
        b = local.numel()
        share = plan.share(torch.arange(dp.rank * b, (dp.rank + 1) * b), 1)
    losses = dpo_per_example(h, share.beta)
    return LossOutput(losses, share.keep.to(h.device, h.dtype), dict(share.metrics), share.kept_total,
                      share.micro_batches)


def weights_table(margins=(-8, -6.907, -4, -2, -1, 0, 1, 2, 4, 6.907, 8, 12),
                  c_maxes=(2.0, 4.0), lam: float = 1.0, tau: float = DEFAULT_TAU) -> list[dict]:
    """Rows of (margin, c(|m|), w(m)) for each c_max: the table `madpo weights` prints."""
    m = torch.tensor(margins, dtype=torch.float64)
    rows = []
    for c_max in c_maxes:
        c = madpo_scale(m.abs(), c_max, lam, tau)
        w = madpo_weights(m, c_max, lam, tau)
        rows += [{"c_max": c_max, "margin": float(mi), "c": float(ci), "weight": float(wi)}
                 for mi, ci, wi in zip(m, c, w)]
    return rows
