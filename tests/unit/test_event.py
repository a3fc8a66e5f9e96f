from __future__ import annotations

import pytest

from forwarder.event import Event, Route


def test_the_wall_and_monotonic_times_can_only_be_given_by_name() -> None:
    """first_received_at (wall clock) and due (monotonic) are both floats: a positional
    call that swapped them would write a 1970 date into the dead-letter file and hold a
    retry for 54 years, so positional times are refused."""
    with pytest.raises(TypeError):
        Event(b"{}", b"", Route.EVENTS, 0, 1_700_000_000.0, 12.5)  # type: ignore[misc]
    event = Event(b"{}", b"", Route.EVENTS, first_received_at=1_700_000_000.0, due=12.5)
    assert (event.first_received_at, event.due) == (1_700_000_000.0, 12.5)
