"""The worker's decisions, as tables: may a sync delete; a failure streak; what makes /healthz fail."""

from __future__ import annotations

import pytest

from sidecar.policy import DELETE_FLOOR, DeleteLimits, FailureStreak, lasting_in_the_way, may_delete, unhealthy

LIMITS = DeleteLimits(max_delete=1000, max_percent=10)


@pytest.mark.parametrize(
    ("count", "holds", "kw", "allowed", "why"),
    [
        (0, 10, {}, True, ""),
        (5, None, {}, True, ""),  # the relative limit waits until the target's size is known
        (DELETE_FLOOR, 21, {}, True, ""),  # at the floor: never refused for its share
        (DELETE_FLOOR + 1, 1000, {}, True, ""),  # 2.1 %
        (101, 1000, {}, False, "101 of the target's 1000 paths (10%), more than SYNC_MAX_DELETE_PERCENT=10"),
        (100, 1000, {}, True, ""),  # exactly 10 %
        (999, 1000, {}, False, "SYNC_MAX_DELETE_PERCENT=10"),  # a source that lost all but one entry
        (1001, 100000, {}, False, "more than SYNC_MAX_DELETE=1000"),
        (3, 3, {"source_empty": True}, False, "the source is empty"),
        (3, 3, {"source_empty": True, "approved": 10}, False, "the source is empty"),  # approval never wipes
        (950, 1000, {"approved": 950}, True, ""),
        (951, 1000, {"approved": 950}, False, "more than the 950 approved"),
        (5000, 100000, {"approved": 5000}, True, ""),  # over SYNC_MAX_DELETE, approved
    ],
)
def test_may_delete(count: int, holds: int | None, kw: dict, allowed: bool, why: str) -> None:
    verdict = may_delete(count, holds, LIMITS, what="a full sync", **kw)
    assert verdict.allowed is allowed
    assert why in verdict.why
    if not allowed and "empty" not in why:
        assert f"approve {count}" in verdict.why and "python -m sidecar plan" in verdict.why
    assert verdict.used_approval == bool(kw.get("approved")) or "empty" in why


def test_failure_streak_asks_for_a_full_sync_after_identical_failures() -> None:
    s = FailureStreak(repeats=3)
    same = ("partial", 'rsync: [receiver] mkdir "d" failed: Not a directory')
    assert [s.failed(same), s.failed(same)] == [False, False]
    assert s.failed(("error", "other"), "error") is False  # a different failure starts over
    assert [s.failed(same), s.failed(same), s.failed(same)] == [False, False, True]
    assert s.failed(same) is False  # and counts again from there
    assert s.failed(same) is False
    assert s.failed(("network", "Connection refused"), "network") is False  # an outage is not the list's fault
    assert s.failed(same) is False  # ... and ends the streak
    s.clear()
    assert [s.failed(same), s.failed(same), s.failed(same)] == [False, False, True]


@pytest.mark.parametrize(
    ("state", "failing_for", "after", "unhealthy_"),
    [
        ("ok", 0, 600, False),
        ("starting", 0, 600, False),
        ("delete_guard", 1e6, 600, False),
        ("failing", 599, 600, False),
        ("failing", 601, 600, True),
        ("failing", 1e6, 0, False),
        ("fatal", 0, 600, True),
        ("fatal", 0, 0, True),
    ],
)
def test_unhealthy(state: str, failing_for: float, after: int, unhealthy_: bool) -> None:
    assert bool(unhealthy(state, failing_for, after)) is unhealthy_


@pytest.mark.parametrize(
    ("stuck", "kept", "delete", "refused", "deleted", "lasting", "recount", "why"),
    [
        ({"x"}, set(), False, False, False, {"x"}, set(), "SYNC_DELETE=false"),  # deletes off: stays
        ({"x"}, set(), True, True, False, {"x"}, set(), "guard refused"),  # until the operator acts
        ({"x"}, set(), True, False, True, {"x"}, set(), "excluded path"),  # a deleting run could not clear it
        ({"x"}, {"x"}, True, False, False, {"x"}, set(), "excluded path"),  # nor could the deleting count
        # The count found nothing to delete and the run had no --delete: x came into the way after the count.
        ({"x"}, set(), True, False, False, set(), {"x"}, ""),
        ({"x", "y"}, {"y"}, True, False, False, {"y"}, {"x"}, "excluded path"),
        (set(), set(), True, False, True, set(), set(), ""),
    ],
)
def test_what_stays_in_the_way(
    stuck: set[str],
    kept: set[str],
    delete: bool,
    refused: bool,
    deleted: bool,
    lasting: set[str],
    recount: set[str],
    why: str,
) -> None:
    way = lasting_in_the_way(stuck, kept, delete, refused, deleted)
    assert (set(way.lasting), set(way.recount)) == (lasting, recount)
    assert why in way.why
