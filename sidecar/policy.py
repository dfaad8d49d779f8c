"""The decisions a worker makes, as pure functions: may this sync delete? what does a failure mean next?
is the target healthy? Each is a table test in ``tests/test_policy.py``; the worker only sequences.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = [
    "DELETE_FLOOR",
    "LIST_FAILURES",
    "REPEATS_BEFORE_FULL_SYNC",
    "DeleteLimits",
    "FailureStreak",
    "InTheWay",
    "Verdict",
    "lasting_in_the_way",
    "may_delete",
    "unhealthy",
]

# A sync removing at most this many paths is never refused by the relative limit: on a site of a few
# dozen files, deleting one picture (its original and ~8 generated sizes) is a large share and normal.
DELETE_FLOOR = 20
# The same batch failure this many times in a row: plan everything again with a full sync instead of
# retrying the identical list forever (a lasting receiver error must not wedge a target). Only failures that
# come from the list itself count: an outage (network, auth, a full disk) fails any list alike.
REPEATS_BEFORE_FULL_SYNC = 3
LIST_FAILURES = frozenset({"partial", "error", "usage"})


@dataclass(frozen=True)
class DeleteLimits:
    """``SYNC_MAX_DELETE`` and ``SYNC_MAX_DELETE_PERCENT``."""

    max_delete: int
    max_percent: int
    floor: int = DELETE_FLOOR


@dataclass(frozen=True)
class Verdict:
    """May a sync delete? ``allowed`` False: nothing is deleted, ``why`` says what and how to proceed."""

    allowed: bool
    why: str = ""
    used_approval: bool = False


def may_delete(
    count: int,
    holds: int | None,
    limits: DeleteLimits,
    *,
    what: str,
    source_empty: bool = False,
    approved: int = 0,
) -> Verdict:
    """The delete guard's decision for one sync that would delete ``count`` paths.

    Args:
        count: paths the sync would delete on the target (everything below a deleted directory counted).
        holds: the larger of the paths the target holds now and those the source holds (None: not known
            yet; the relative limit then waits for it). Not the target's alone: a target that was down
            during a burst holds a fraction of the source, and the deletes of that burst are a large share
            of that fraction although the source is whole.
        limits: the limits.
        what: "a batch" or "a full sync", for the message.
        source_empty: the source has no entries at all (an unmounted volume, almost always).
        approved: a one-off operator approval of up to this many deletes (0: none).

    Example:
        >>> may_delete(950, 1000, DeleteLimits(1000, 10), what="a full sync").allowed
        False
        >>> may_delete(950, 1000, DeleteLimits(1000, 10), what="a full sync", approved=1000).allowed
        True
    """
    if count <= 0:
        return Verdict(True)
    if source_empty:
        return Verdict(
            False,
            f"the source is empty but {what} would delete {count} paths on the target; refusing to delete "
            "them (is the uploads volume mounted?)",
        )
    how = f"check with `python -m sidecar plan`; if intended, allow it once with `python -m sidecar approve {count}`"
    if approved:
        if count <= approved:
            return Verdict(True, used_approval=True)
        return Verdict(
            False, f"{what} would delete {count} paths, more than the {approved} approved; {how}", used_approval=True
        )
    if count > limits.max_delete:
        return Verdict(
            False, f"{what} would delete {count} paths, more than SYNC_MAX_DELETE={limits.max_delete}; {how}"
        )
    if count > limits.floor and holds and count * 100 > limits.max_percent * holds:
        share = round(count * 100 / holds)
        return Verdict(
            False,
            f"{what} would delete {count} of the target's {holds} paths ({share}%), more than "
            f"SYNC_MAX_DELETE_PERCENT={limits.max_percent}; {how}",
        )
    return Verdict(True)


class FailureStreak:
    """Consecutive identical batch failures of one target.

    Example:
        >>> s = FailureStreak()
        >>> [s.failed(("partial", "Not a directory")) for _ in range(3)]
        [False, False, True]
    """

    def __init__(self, repeats: int = REPEATS_BEFORE_FULL_SYNC) -> None:
        self.repeats = repeats
        self._last: Hashable = None
        self._count = 0

    def failed(self, key: Hashable, reason: str = "partial") -> bool:
        """Count a failure; True when it is the ``repeats``-th identical one in a row (then start over).
        A failure whose ``reason`` is not about the list (see ``LIST_FAILURES``) ends the streak."""
        if reason not in LIST_FAILURES:
            self.clear()
            return False
        self._count = self._count + 1 if key == self._last else 1
        self._last = key
        if self._count >= self.repeats:
            self.clear()
            return True
        return False

    def clear(self) -> None:
        self._last, self._count = None, 0


@dataclass(frozen=True)
class InTheWay:
    """What a full sync could not place: ``lasting`` stays in the way for ``why`` (later writes of those names ask
    for no further full sync); ``recount`` came into the way after the count (one more full sync counts it)."""

    lasting: frozenset[str]
    recount: frozenset[str]
    why: str


def lasting_in_the_way(stuck: set[str], kept: set[str], delete: bool, refused: bool, deleted: bool) -> InTheWay:
    """Sort the paths a full sync could not place (a directory on the target in their way).

    ``stuck``: what the run reported; ``kept``: what its deleting dry run reported too (an excluded path below
    the directory, never deleted); ``delete``: ``SYNC_DELETE``; ``refused``: the guard refused this sync's
    deletes; ``deleted``: the run had ``--delete`` (it was allowed to delete what it counted).

    Example:
        >>> lasting_in_the_way({"a"}, set(), delete=True, refused=False, deleted=False).recount
        frozenset({'a'})
    """
    if not delete:
        return InTheWay(frozenset(stuck), frozenset(), "deletes are off (SYNC_DELETE=false)")
    if refused:
        return InTheWay(frozenset(stuck), frozenset(), "the delete guard refused this sync's deletes")
    lasting = stuck if deleted else stuck & kept
    return InTheWay(
        frozenset(lasting),
        frozenset(stuck - lasting),
        "the target keeps something below it that is never deleted (an excluded path)",
    )


def unhealthy(state: str, failing_for_s: float, after_s: int) -> str:
    """Why a target makes the daemon unhealthy ('' when it does not).

    A target that needs the operator (``fatal``) is unhealthy at once; one that keeps failing is after
    ``after_s`` seconds (0: never). ``starting``, ``ok`` and ``delete_guard`` keep ``/healthz`` green:
    restarting the sidecar cannot help with any of them (the guard waits for an operator decision, shown by
    ``/readyz`` and the metrics).

    Example:
        >>> unhealthy("failing", 700, 600), unhealthy("failing", 10, 600), unhealthy("delete_guard", 9e9, 600)
        ('failing for 700 s (longer than SYNC_UNHEALTHY_AFTER_S=600)', '', '')
    """
    if state == "fatal":
        return "needs the operator (fatal)"
    if state == "failing" and after_s and failing_for_s > after_s:
        return f"failing for {failing_for_s:.0f} s (longer than SYNC_UNHEALTHY_AFTER_S={after_s})"
    return ""
