"""Checkpoint integrity checks used by resume (no Ray needed)."""


def test_partial_checkpoint_is_never_chosen(tmp_path):
    """A copy interrupted midway (state.pt shorter than meta.json says) is skipped on resume."""
    import json as _json

    from madpo_ray.engine.checkpoints import checkpoint_step, find_checkpoints, newest_checkpoint

    for name, step, truncate in (("checkpoint_a", 2, False), ("checkpoint_b", 4, True), ("checkpoint_c", 3, False)):
        d = tmp_path / name
        d.mkdir()
        (d / "state.pt").write_bytes(b"x" * 100)
        (d / "meta.json").write_text(_json.dumps({"step": step, "bytes": 100}))
        if truncate:
            (d / "state.pt").write_bytes(b"x" * 40)
    (tmp_path / "checkpoint_d").mkdir()  # no meta at all: a write killed before meta.json
    assert checkpoint_step(tmp_path / "checkpoint_b") is None
    assert newest_checkpoint(find_checkpoints(str(tmp_path))) == tmp_path / "checkpoint_c"
