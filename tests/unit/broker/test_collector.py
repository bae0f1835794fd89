"""Bulk steps pause the cycle collector (broker/collector.py), and only they do."""

import gc

import pytest

from tasync.broker.collector import collector_paused


def test_collector_paused_for_a_bulk_step_only_and_back_after_an_error() -> None:
    assert gc.isenabled()
    with collector_paused(bulk=False):
        assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        assert not gc.isenabled()
        raise ValueError("a bulk step failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # whoever paused it first turns it back on
    finally:
        gc.enable()
