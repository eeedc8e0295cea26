"""The default run's scored pairs, which the Ray benchmarks start from (made if missing)."""

from __future__ import annotations

import shutil

from _common import ROOT


def default_pipeline():
    """runs/tiny up to the score stage (about 4.5 minutes on 2 cores when it is not there yet)."""
    import os

    os.chdir(ROOT)
    from madpo_ray.config import load_config
    from madpo_ray.layout import BEFORE_POLICY
    from madpo_ray.pipeline import Pipeline

    p = Pipeline(load_config("tiny"))
    p.run(BEFORE_POLICY)
    return p


def clone_until_policy(src, name: str, overrides: list[str]):
    """A run sharing src's scored pairs, so only the policy stage runs."""
    from madpo_ray.config import config_from_dict
    from madpo_ray.layout import BEFORE_POLICY
    from madpo_ray.pipeline import Pipeline

    cfg = config_from_dict(src.cfg.model_dump(mode="json"), [f"name={name}"] + overrides)
    p = Pipeline(cfg)
    shutil.rmtree(p.layout.run_dir, ignore_errors=True)
    for stage in BEFORE_POLICY:
        shutil.copytree(src.layout.stage_dir(stage), p.layout.stage_dir(stage))
    return p
