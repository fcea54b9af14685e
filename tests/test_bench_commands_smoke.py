"""The commands-per-admission count (bench/commands.py) runs end to end, so its code cannot rot."""

from __future__ import annotations

import pytest

from bench.commands import measure


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_commands_per_admission_are_counted_on_both_paths() -> None:
    fast, queued = await measure(repeats=3)
    # Each path is two script calls at least (enqueue, release), and they run commands inside.
    assert fast.delta["fcall"] >= 2 * fast.admissions
    assert 2 < fast.per_admission < queued.per_admission
    assert queued.delta["blmpop"] >= 1  # the queued request was woken through its inbox
