"""``with`` closes sinks and stops servers, after an error too."""

from __future__ import annotations

import pytest

from streams.lifecycle import ClosesOnExit, StopsOnExit


class _Sink(ClosesOnExit):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class _Server(StopsOnExit):
    def __init__(self) -> None:
        self.log: list[str] = []

    def start(self) -> _Server:
        self.log.append("start")
        return self

    def stop(self) -> None:
        self.log.append("stop")


def test_with_closes_and_stops_even_after_an_error():
    sink, server = _Sink(), _Server()
    with pytest.raises(RuntimeError, match="boom"):
        with sink as entered, server as running:
            assert entered is sink and running is server and server.log == ["start"]
            raise RuntimeError("boom")
    assert sink.closed == 1 and server.log == ["start", "stop"]
