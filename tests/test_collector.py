"""The collector policy around a plugin's rows: rarer collections while rows are made, everything as it was after."""

from __future__ import annotations

import gc
import weakref

import pytest

from volplugins.pool import collector


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _default_policy():
    gc.collect()  # rows an earlier test abandoned end now, not in the middle of these
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def _watch(rows: int, seen: list):
    for number in range(rows):
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        yield number


def test_rows_are_made_under_the_policy_and_the_policy_ends_with_them():
    before = gc.get_threshold()
    seen: list = []
    assert list(collector.fewer_collections(_watch(3, seen))) == [0, 1, 2]
    assert all(threshold == collector.ROWS_THRESHOLDS and frozen > 0 for threshold, frozen in seen)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_abandoned_or_failing_rows_put_the_policy_back():
    before = gc.get_threshold()
    rows = collector.fewer_collections(_watch(10, []))
    next(rows)
    rows.close()
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)

    def failing():
        yield 1
        raise ValueError("bad record")

    with pytest.raises(ValueError):
        list(collector.fewer_collections(failing()))
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)


def test_a_freeze_made_by_the_caller_is_left_in_place():
    kept = _Node()
    gc.freeze()
    assert not any(item is kept for item in gc.get_objects())  # frozen objects are not listed
    list(collector.fewer_collections(_watch(2, [])))
    assert not any(item is kept for item in gc.get_objects())


def test_rows_drawn_in_turns_keep_the_policy_until_the_last_ends():
    before = gc.get_threshold()
    first, second = collector.fewer_collections(_watch(2, [])), collector.fewer_collections(_watch(3, []))
    next(first)
    next(second)
    list(first)
    assert (gc.get_threshold(), gc.get_freeze_count() > 0) == (collector.ROWS_THRESHOLDS, True)
    list(second)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)


def test_cycles_made_while_rows_are_made_are_still_collected():
    def rows():
        first = weakref.ref(_Node())
        for number in range(3 * collector.ROWS_THRESHOLDS[0]):
            _Node()
            if first() is None:
                yield number
                return
        yield -1

    assert list(collector.fewer_collections(rows())) != [-1]
