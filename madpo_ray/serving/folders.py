"""What `madpo serve` serves, checked before any replica starts: the model folder (or the stage
folder that holds it), the name clients call it by, and LoRA adapters that fit the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from madpo_ray.layout import adapter_folder, model_folder


def resolve_model_folder(path: str) -> str:
    """`madpo serve --model` takes the model folder or its stage folder (runs/<name>/policy/madpo):
    a folder without config.json whose `model/` subfolder has one means that subfolder."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (model_folder(p) / "config.json").exists():
        return str(model_folder(p))
    return str(p)


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """`--lora tuned=runs/x/policy/madpo` (repeatable) as {name: folder}."""
    adapters = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"--lora {spec!r}: expected NAME=FOLDER, e.g. tuned=runs/tiny/policy/madpo")
        if name.strip() in adapters:
            raise ValueError(f"--lora: the name {name.strip()!r} is given twice")
        adapters[name.strip()] = folder.strip()
    return adapters


def served_name(model: str, model_name: Optional[str] = None) -> str:
    """The name clients use for the base model: given, else the stage's folder name (`madpo` for
    runs/<run>/policy/madpo/model)."""
    return model_name or Path(model).parent.name or "madpo-policy"


def resolve_adapters(adapters: dict[str, str], base_name: str, base_dir: Optional[str] = None) -> dict[str, str]:
    """Each adapter's folder holding adapter_config.json: the folder itself or, for a stage folder
    that LoRA trained (runs/<name>/policy/madpo), its `adapter/`. With the base model's folder,
    also that its weights fit the base's layers. Refused with the reason otherwise: vLLM loads an
    adapter on its first request, so a bad one would otherwise surface as that request's 500."""
    resolved = {}
    for name, folder in adapters.items():
        if name == base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name; give the adapter another")
        candidates = [Path(folder), adapter_folder(Path(folder))]
        found = next((c for c in candidates if (c / "adapter_config.json").is_file()), None)
        if found is None:
            raise ValueError(f"adapter {name!r}: no adapter_config.json in {folder} or {candidates[1]} "
                             f"(a stage trained with model.lora, or a peft adapter folder)")
        problems = adapter_shape_errors(found, Path(base_dir)) if base_dir else []
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"adapter {name!r} ({found}) does not fit the base model {base_dir}: "
                             + "; ".join(problems[:3]) + more)
        resolved[name] = str(found.resolve())
    return resolved


def adapter_shape_errors(adapter_dir: Path, base_dir: Path) -> list[str]:
    """Where the adapter cannot serve on this base: a lora_A that does not take its layer's inputs
    or a lora_B that does not give its outputs (a layer's weight is (out, in), or (in, out) with
    peft's fan_in_fan_out), or a kind vLLM does not serve (DoRA). Reads only the safetensors
    headers. A layer the base's files do not name as the adapter does (quantised weights, another
    naming) is left to vLLM rather than refused. A pickled .bin adapter is refused: we never load
    one."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"no adapter_model.safetensors in {adapter_dir} (pickled .bin adapters are not loaded)"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        return ["it is a DoRA adapter, which vLLM does not serve; merge it (the stage's model/) instead"]
    base: dict[str, list[int]] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            base.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    problems = []
    with safe_open(str(weights), "pt") as st:
        for key in st.keys():
            module, _, part = key.rpartition(".lora_")
            layer = module.removeprefix("base_model.model.")
            target = base.get(layer + ".weight")
            if part not in ("A.weight", "B.weight") or target is None or len(target) != 2:
                continue
            out_features, in_features = target[::-1] if config.get("fan_in_fan_out") else target
            shape = st.get_slice(key).get_shape()
            if part == "A.weight" and shape[1] != in_features:
                problems.append(f"{layer}: lora_A takes {shape[1]} inputs, the layer has {in_features}")
            elif part == "B.weight" and shape[0] != out_features:
                problems.append(f"{layer}: lora_B gives {shape[0]} outputs, the layer has {out_features}")
    return sorted(set(problems))
