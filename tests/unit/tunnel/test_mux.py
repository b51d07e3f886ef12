"""The stream multiplexer's rules: windows are enforced, bad frames abort one stream only."""

from typing import Any, cast

import pytest

from p2prc.errors import TunnelProtocolError
from p2prc.tunnel.mux import WINDOW, Mux
from p2prc.tunnel.protocol import Abort, Credit, Data, End, Message, MessageError, parse
from p2prc.tunnel.streams import FramedStream


class _Control:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def try_send(self, message: Message) -> bool:
        self.sent.append(message)
        return True


def _deliver(mux: Mux, raw: dict[str, Any]) -> None:
    """What a receive loop does with one decoded frame."""
    try:
        message = parse(raw)
    except MessageError as exc:
        mux.reject(exc.stream)
        return
    assert isinstance(message, Data | End | Abort | Credit)
    mux.dispatch(message)


def _mux() -> tuple[Mux, _Control]:
    control = _Control()
    return Mux(cast(FramedStream, control)), control


def test_data_within_the_window_is_queued_in_order() -> None:
    mux, control = _mux()
    stream = mux.open(1)
    mux.dispatch(Data(1, b"a" * (WINDOW - 1)))
    mux.dispatch(Data(1, b"b"))
    mux.dispatch(End(1))
    assert list(stream.inbound) == [b"a" * (WINDOW - 1), b"b", None]
    assert not stream.aborted
    assert control.sent == []


def test_a_stream_over_its_window_is_aborted_alone() -> None:
    mux, control = _mux()
    greedy, quiet = mux.open(1), mux.open(2)
    mux.dispatch(Data(1, b"x" * WINDOW))
    mux.dispatch(Data(1, b"x"))
    assert greedy.aborted
    assert not quiet.aborted
    assert control.sent == [Abort(1)]


def test_bad_frames_abort_or_are_ignored() -> None:
    mux, control = _mux()
    stream = mux.open(1)
    _deliver(mux, {"type": "d", "s": 99, "b": b"for a closed stream"})  # ignored
    _deliver(mux, {"type": "d", "s": "1", "b": b"bad id"})  # ignored
    _deliver(mux, {"type": "w", "s": 99, "n": 0})  # bad, but for no open stream: ignored
    assert not stream.aborted
    _deliver(mux, {"type": "w", "s": 1, "n": WINDOW + 1})  # more credit than a window
    assert stream.aborted
    other = mux.open(2)
    _deliver(mux, {"type": "d", "s": 2, "b": "text, not bytes"})
    assert other.aborted
    assert control.sent == [Abort(1), Abort(2)]


def test_credit_and_remote_abort() -> None:
    mux, _ = _mux()
    stream = mux.open(1)
    stream.credit = 0
    stream.may_send.clear()
    mux.dispatch(Credit(1, 4096))
    assert stream.credit == 4096
    assert stream.may_send.is_set()
    mux.dispatch(Abort(1))
    assert stream.aborted


def test_a_closed_mux_opens_nothing() -> None:
    mux, _ = _mux()
    stream = mux.open(1)
    mux.abort_all()
    assert stream.aborted
    with pytest.raises(TunnelProtocolError, match="closed"):
        mux.open(2)


async def test_a_relay_cannot_open_a_stream_to_a_port_the_client_did_not_expose() -> None:
    from p2prc.identity import Identity
    from p2prc.tunnel.client import TunnelClient
    from p2prc.tunnel.protocol import Open

    client = TunnelClient(Identity.generate(), "127.0.0.1", 1, "relay")
    client._local_hosts[8000] = "127.0.0.1"
    mux, control = _mux()
    stream = cast(FramedStream, control)
    for sid, port in [(1, 22), (2, 8000.0), (3, "8000"), (4, None), (5, True), ("6", 8000)]:
        try:
            message = parse({"type": "open", "s": sid, "local_port": port})
        except MessageError as exc:
            client._malformed(stream, mux, exc)
        else:
            assert isinstance(message, Open)
            await client._open(stream, mux, message)
    assert control.sent == [Abort(sid) for sid in (1, 2, 3, 4, 5, 0)]
    assert mux.streams == {}
