"""Leaving out undecodable files (pipelines.common.ShardedFileLoader), independent of the decoder."""

import json

import pytest

from mae_fast.pipelines.common import ShardedFileLoader


class _Loader(ShardedFileLoader):
    kind = "test"


def loader(n: int = 6) -> ShardedFileLoader:
    return _Loader([f"/d/{i}.jpg" for i in range(n)], 2, seed=0, shard_id=0, num_shards=1, batches_per_epoch=None)


def test_substitutes_chain_and_repeat():
    ld = loader()
    substitutes = ld.substitutes  # updated in place: a running DALI feed holds this very dict
    assert ld.leave_out(1, "bad") == 2
    assert ld.leave_out(2, "bad too") == 3  # 1 was read as 2: it moves on to 3 as well
    assert substitutes == {1: 3, 2: 3} and ld.substitutes is substitutes
    assert ld.leave_out(1, "again") == 3  # already left out: same substitute, not reported twice
    assert ld.take_bad_files() == [("/d/1.jpg", "bad"), ("/d/2.jpg", "bad too")]
    assert ld.take_bad_files() == []
    assert ld.leave_out(5, "last") == 0  # wraps around
    assert ld.leave_out(0, "x") == 3 and ld.substitutes[5] == 3
    assert ld.leave_out(3, "x") == 4 and set(ld.substitutes.values()) == {4}
    with pytest.raises(RuntimeError, match="no file of the 6 can be decoded"):
        ld.leave_out(4, "the last good one")


def test_files_found_by_another_rank_are_left_out_without_a_report():
    ld = loader()
    ld.leave_out_paths([("/d/4.jpg", "found by rank 1"), ("/elsewhere.jpg", "not in this list")])
    assert ld.substitutes == {4: 5} and ld.take_bad_files() == []
    state = json.loads(json.dumps(ld.state()))
    again = loader()
    again.load_state(state)
    assert again.substitutes == {4: 5}
