"""The pins' admission check and bookkeeping (`adapters/pins.py`), without an engine."""

from __future__ import annotations

import pytest

from adapters.errors import AdapterError
from adapters.pins import Pins
from adapters.registry import AdapterEntry


def entry(adapter_id: int, name: str, pages: int) -> AdapterEntry:
    return AdapterEntry(id=adapter_id, name=name, path=None, max_rank=8, nbytes=0, pages=pages)


def pin(pins: Pins, e: AdapterEntry, replace: bool = False) -> None:
    with pins.admitting(True, e.name, e.pages, replace):
        pins.add(e)


def test_pins_are_refused_past_their_pages_and_the_last_free_slot() -> None:
    pins = Pins(capacity=10, max_slots=3)
    pin(pins, entry(1, "a", 6))
    with pytest.raises(AdapterError, match="pins may take 10 pages") as refused:
        pin(pins, entry(2, "b", 5))
    assert refused.value.code == "pin_refused"
    pin(pins, entry(3, "c", 4))  # exactly the capacity
    assert pins.pages() == 10 and pins.names() == ["a", "c"]
    with pytest.raises(AdapterError, match="last free adapter slot of 3"):
        pin(pins, entry(4, "d", 0))  # a third pin would leave no slot for a request's adapter
    pins.drop(1)
    assert pins.names() == ["c"] and pins.pages() == 4


def test_a_replacement_is_checked_without_the_pin_it_replaces() -> None:
    pins = Pins(capacity=10, max_slots=8)
    old = entry(1, "a", 8)
    pin(pins, old)
    old.unloading = True  # what the registry does to a replaced entry
    pin(pins, entry(2, "a", 8), replace=True)
    # The replaced version's pages go back to the pool as its last requests end.
    assert pins.names() == ["a"] and pins.pages() == 8 and pins.pages(excluding=[2]) == 0


def test_new_pins_are_handed_over_once_and_an_unpinned_load_is_not_checked() -> None:
    pins = Pins(capacity=1, max_slots=2)
    with pins.admitting(False, "big", 100, False):
        pass
    first = entry(1, "a", 1)
    pin(pins, first)
    assert pins.take_new() == [first] and pins.take_new() == []
    assert pins.get(1) is first and pins.get(2) is None
