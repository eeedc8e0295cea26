"""The worker group's queue of trainings (runtime.TrainingQueue), as plain Python: what every
worker is handed, where a restarted group picks up, and what the driver learns. The group itself
runs in the Ray tests (test_pipeline_ray.py)."""

from madpo_ray.runtime import TrainingQueue


def test_every_worker_gets_the_same_training_in_order_and_the_end():
    q = TrainingQueue()
    assert q.job(0, "w0") == ("wait", None)  # nothing posted yet: the workers wait
    assert q.post({"stage": "sft"}) == 0 and q.post({"stage": "reward"}) == 1
    assert q.job(0, "w0") == ("run", {"stage": "sft"}) == q.job(0, "w1")
    assert q.job(1, "w1") == ("run", {"stage": "reward"})
    assert q.job(2, "w0") == ("wait", None)
    q.post(None)
    assert q.job(2, "w0") == ("stop", None)


def test_a_restarted_group_takes_the_unfinished_training_again():
    q = TrainingQueue()
    for stage in ("sft", "reward", "policy"):
        q.post({"stage": stage})
    assert q.first_unfinished() == 0
    q.finish(0)
    assert q.first_unfinished() == 1  # reward was taken, then its workers died: taken again
    assert q.jobs[0] == {"kind": None, "released": True}  # a finished job lets go of its examples' references
    q.finish(1)
    q.finish(2)
    assert q.first_unfinished() == 3  # all done: the next one posted
    q2 = TrainingQueue()
    q2.post({"stage": "sft"})
    q2.finish(0)
    q2.post({"stage": "policy"})
    assert q2.first_unfinished() == 1


def test_the_driver_learns_when_a_training_was_first_taken_and_by_which_workers():
    q = TrainingQueue()
    q.post({"stage": "sft"})
    assert q.status(0) == (False, None, [])
    q.job(0, "host:12")
    at = q.status(0)[1]
    q.job(0, "host:11")  # the second worker (or a restarted one) adds itself; the first time stays
    q.job(0, "host:12")
    assert q.status(0) == (False, at, ["host:11", "host:12"])
    q.finish(0)
    assert q.status(0) == (True, at, ["host:11", "host:12"])


def test_a_waiting_worker_and_driver_are_woken_by_the_post_and_the_finish():
    """Workers and the driver wait inside the actor's call (no polling): a post or a finish from
    another thread ends the wait; with nothing happening the call returns after its timeout."""
    import threading
    import time

    q = TrainingQueue()
    t0 = time.monotonic()
    assert q.job(0, "w0", timeout=0.2) == ("wait", None) and time.monotonic() - t0 >= 0.2
    threading.Timer(0.1, q.post, args=({"stage": "sft"},)).start()
    assert q.job(0, "w0", timeout=30) == ("run", {"stage": "sft"})
    threading.Timer(0.1, q.finish, args=(0,)).start()
    t0 = time.monotonic()
    done, _, who = q.status(0, timeout=30)
    assert done and who == ["w0"] and time.monotonic() - t0 < 10


def test_a_run_starts_its_configured_cluster_before_it_puts_anything_in_ray(tmp_path, monkeypatch):
    """ray.put with no cluster running starts Ray's default one (without the configured address,
    CPUs or worker environment), and init_ray then finds Ray running and does nothing: a run's
    first use of Ray, for a training or the scoring pass, must be init_ray (through workers())."""
    import pytest
    import ray

    from madpo_ray import pipeline
    from madpo_ray.launcher import Training

    from helpers import tiny_config

    if ray.is_initialized():
        pytest.skip("a Ray test of this process started a cluster already; `make test` runs this one without")

    class ClusterStarting(Exception):
        pass

    running_at_start = []

    def init_ray(cfg):
        running_at_start.append(ray.is_initialized())
        raise ClusterStarting

    monkeypatch.setattr(pipeline, "init_ray", init_ray)
    p = pipeline.Pipeline(tiny_config(tmp_path, "order"))
    with pytest.raises(ClusterStarting):
        p.train_on_ray(Training("sft", p.cfg, "unused"), [{"input_ids": [1, 2]}], "index")
    with pytest.raises(ClusterStarting):
        p.score_in_workers([{"prompt": "x"}], "ref", "reward", tmp_path / "scored")
    assert running_at_start == [False, False] and not ray.is_initialized()
