import pytest

from p2prc import errors


def _every_class() -> list[type[errors.P2PRCError]]:
    found: list[type[errors.P2PRCError]] = [errors.P2PRCError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


def test_codes_are_unique_and_round_trip() -> None:
    classes = _every_class()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert errors.error_class(cls.code) is cls
        assert 400 <= cls.status < 600


def test_unknown_code_is_api_error() -> None:
    assert errors.error_class("no_such_code") is errors.ApiError


def test_error_body_shape() -> None:
    exc = errors.NotTrusted("nope")
    assert exc.to_body() == {"error": {"code": "not_trusted", "message": "nope"}}
    assert exc.status == 403


def test_peer_timeout_is_a_timeout_error() -> None:
    assert issubclass(errors.PeerTimeout, TimeoutError)


def test_map_exceptions_translates_and_keeps_cause() -> None:
    with (
        pytest.raises(errors.PeerTimeout) as info,
        errors.map_exceptions({TimeoutError: errors.PeerTimeout, OSError: errors.PeerUnreachable}),
    ):
        raise TimeoutError("slow")
    assert isinstance(info.value.__cause__, TimeoutError)


def test_map_exceptions_leaves_unknown_exceptions() -> None:
    with pytest.raises(KeyError), errors.map_exceptions({OSError: errors.PeerUnreachable}):
        raise KeyError("x")
