"""The run summary's at-a-glance table (rendering.summary_rows)."""

from madpo_ray.rendering import summary_rows


def test_summary_rows_side_by_side_without_timings():
    summary = {"sft_preference_accuracy": 0.5, "policy_preference_accuracy": 0.75, "reward_tokens_per_s": 10.0,
               "pairs": 12, "workers_start_seconds": 22.5, "policy_wall_seconds": 3.0, "loss": "madpo",
               "stage_seconds": {"sft": 1.0}, "ok": True}
    assert summary_rows(summary) == [("preference accuracy", "0.500", "", "0.750"),
                                     ("tokens per s", "", "10.000", ""), ("pairs", "", "", "12")]
