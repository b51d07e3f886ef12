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


def test_validation_message_is_one_line_per_problem() -> None:
    from pydantic import BaseModel, ValidationError, field_validator

    class Body(BaseModel):
        port: int
        name: str

        @field_validator("name")
        @classmethod
        def _short(cls, value: str) -> str:
            if len(value) > 3:
                raise ValueError("too long")
            return value

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"port": "x", "name": "long"})
    message = errors.validation_message(caught.value)
    assert message.startswith("port: ")
    assert message.endswith("; name: too long")  # no "Value error, " prefix
    assert "\n" not in message


def test_unique_prefix_prefers_a_name_then_a_unique_id_prefix() -> None:
    from p2prc._match import unique_peer, unique_prefix

    items = [("abc123", "web"), ("abd456", "db"), ("ffe789", "abd")]
    pick = dict(ident=lambda item: item[0], name=lambda item: item[1], what="thing")
    assert unique_prefix("ABC", items, **pick) == items[0]  # type: ignore[arg-type]
    assert unique_prefix("abd", items, **pick) == items[2]  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidRequest, match="matches 2 things"):
        unique_prefix("ab", items, **pick)  # type: ignore[arg-type]
    with pytest.raises(errors.NotFound, match="no thing named 'zz'"):
        unique_prefix("zz", items, **pick)  # type: ignore[arg-type]
    with pytest.raises(errors.PeerNotFound, match="no peer given"):
        unique_peer(" ", items, ident=lambda item: item[0], name=lambda item: item[1])
