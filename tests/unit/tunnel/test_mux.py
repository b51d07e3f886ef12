"""The stream multiplexer's rules: windows are enforced, bad frames abort one stream only."""

from typing import Any, cast

import pytest

from p2prc.errors import TunnelProtocolError
from p2prc.tunnel.mux import WINDOW, Mux
from p2prc.tunnel.streams import FramedStream


class _Control:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def try_send(self, message: dict[str, Any]) -> bool:
        self.sent.append(message)
        return True


def _mux() -> tuple[Mux, _Control]:
    control = _Control()
    return Mux(cast(FramedStream, control)), control


def test_data_within_the_window_is_queued_in_order() -> None:
    mux, control = _mux()
    stream = mux.open(1)
    mux.dispatch({"type": "d", "s": 1, "b": b"a" * (WINDOW - 1)})
    mux.dispatch({"type": "d", "s": 1, "b": b"b"})
    mux.dispatch({"type": "e", "s": 1})
    assert list(stream.inbound) == [b"a" * (WINDOW - 1), b"b", None]
    assert not stream.aborted
    assert control.sent == []


def test_a_stream_over_its_window_is_aborted_alone() -> None:
    mux, control = _mux()
    greedy, quiet = mux.open(1), mux.open(2)
    mux.dispatch({"type": "d", "s": 1, "b": b"x" * WINDOW})
    mux.dispatch({"type": "d", "s": 1, "b": b"x"})
    assert greedy.aborted
    assert not quiet.aborted
    assert control.sent == [{"type": "x", "s": 1}]


def test_bad_frames_abort_or_are_ignored() -> None:
    mux, control = _mux()
    stream = mux.open(1)
    mux.dispatch({"type": "d", "s": 99, "b": b"for a closed stream"})  # ignored
    mux.dispatch({"type": "d", "s": "1", "b": b"bad id"})  # ignored
    assert not stream.aborted
    mux.dispatch({"type": "w", "s": 1, "n": WINDOW + 1})  # more credit than a window
    assert stream.aborted
    other = mux.open(2)
    mux.dispatch({"type": "d", "s": 2, "b": "text, not bytes"})
    assert other.aborted
    assert [m["s"] for m in control.sent] == [1, 2]


def test_credit_and_remote_abort() -> None:
    mux, _ = _mux()
    stream = mux.open(1)
    stream.credit = 0
    stream.may_send.clear()
    mux.dispatch({"type": "w", "s": 1, "n": 4096})
    assert stream.credit == 4096
    assert stream.may_send.is_set()
    mux.dispatch({"type": "x", "s": 1})
    assert stream.aborted


def test_a_closed_mux_opens_nothing() -> None:
    mux, _ = _mux()
    stream = mux.open(1)
    mux.abort_all()
    assert stream.aborted
    with pytest.raises(TunnelProtocolError, match="closed"):
        mux.open(2)


def test_a_relay_cannot_open_a_stream_to_a_port_the_client_did_not_expose() -> None:
    from p2prc.identity import Identity
    from p2prc.tunnel.client import TunnelClient

    client = TunnelClient(Identity.generate(), "127.0.0.1", 1, "relay")
    client._local_hosts[8000] = "127.0.0.1"
    mux, control = _mux()
    for sid, port in [(1, 22), (2, 8000.0), (3, "8000"), (4, None)]:
        client._open(
            cast(FramedStream, control), mux, {"type": "open", "s": sid, "local_port": port}
        )
    assert control.sent == [{"type": "x", "s": sid} for sid in (1, 2, 3, 4)]
    assert mux.streams == {}
