"""How a model is spread over data-parallel workers (`ray.strategy`).

ddp: every worker holds the whole model, its gradients and its optimiser state (Ray's
`prepare_model`). fsdp: FSDP2's `fully_shard` on every transformer block and on the root, so
each of N workers holds 1/N of the parameters, gradients and AdamW state and gathers a block's
weights just before the block runs. Verified on CPU with gloo (torch 2.13): the loss trajectory
equals DDP's (tests/engine/test_fsdp.py).

Checkpoints of a sharded model are sharded too: each worker saves its own shards of the
parameters and optimiser state as plain tensors (`local_tree`), and reads them back into the
shape of the running model (`sharded_like`). torch.distributed.checkpoint is not used: its
reader unpickles `.metadata` with plain `pickle.load`, and a checkpoint on shared storage must
be data, never code. The full weights are gathered once, at the end, for the HF folder.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to shard one by one: the classes HF models name in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"ray.strategy=fsdp: {type(model).__name__} names no transformer block class "
                         "(_no_split_modules) to shard")
    return blocks


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over the default process group: each block its own unit, the rest (embeddings,
    final norm, head) the root's. The model keeps its class, so code that calls it is unchanged."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP unit back to its shards. FSDP2 leaves the root's parameters gathered after a
    forward (backward would gather them again), so after an evaluation they are full tensors:
    code that reads or writes parameters shard by shard (early stopping's best weights) calls
    this first. A no-op for an unsharded model."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward does (or, on micro-batches before the last, does not) reduce
    gradients across workers: DDP's no_sync, FSDP's set_requires_gradient_sync."""
    if enabled:
        return contextlib.nullcontext()
    if is_sharded(model):
        return fsdp_no_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def as_float(value: Any) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


# --------------------------------------------------------------------------- sharded state
def local_tree(tree: Any) -> Any:
    """A state tree with every DTensor replaced by this worker's shard (a plain tensor)."""
    if isinstance(tree, dict):
        return {k: local_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_tree(v) for v in tree)
    return tree.to_local() if hasattr(tree, "to_local") else tree


def as_shard_of(local: torch.Tensor, like) -> Any:
    """`local` as this worker's shard of a DTensor laid out like `like` (itself if `like` is plain)."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride())


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This worker's shards of the model and optimiser state, as plain tensors keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": local_tree(get_model_state_dict(model)),
            "optimizer": local_tree(get_optimizer_state_dict(model, optimizer))}


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of `sharded_state` on the same number of workers: each shard back into a
    DTensor laid out like the running model's parameter of that name."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    current = get_model_state_dict(model)
    set_model_state_dict(model, {k: as_shard_of(v, current[k]) for k, v in state["model"].items()})
    params = dict(model.named_parameters())
    optim = state["optimizer"]
    per_param = {name: {k: as_shard_of(v, params[name]) if torch.is_tensor(v) and v.dim() else v
                        for k, v in slots.items()} for name, slots in optim["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": optim["param_groups"]})


def full_state_dict(model: torch.nn.Module) -> dict:
    """Every worker calls it (a collective); rank 0 gets the full weights on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
