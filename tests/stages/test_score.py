"""The scoring pass split over the run's workers (stages/score.score_shard): rank r scores rows
r, r + W, r + 2W, ...; rank 0 puts the gathered rows back in order."""

import pytest

from madpo_ray.stages.score import interleaved


@pytest.mark.parametrize("n,world", [(7, 3), (6, 3), (2, 3), (0, 2), (5, 1)])
def test_the_shards_put_back_together_are_the_rows_in_order(n, world):
    rows = [{"row_id": i} for i in range(n)]
    parts = [rows[r::world] for r in range(world)]  # what each rank scores (score_shard's split)
    assert interleaved(parts) == rows


def test_a_shard_lost_or_doubled_is_not_the_rows():
    rows = list(range(7))
    assert interleaved([rows[0::3], rows[1::3], rows[1::3]]) != rows
