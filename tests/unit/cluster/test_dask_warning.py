"""p2prc.dask hides Dask's version table only when Python's patch release is all that differs."""

import re

import pytest

pytest.importorskip("distributed")

from distributed.versions import error_message

from p2prc.dask import _PATCH_ONLY


def _message(client: dict[str, str], image: dict[str, str]) -> str:
    workers = {"tls://127.0.0.1:1": {"packages": image}}
    answer = error_message({"packages": image}, workers, {"packages": client})  # type: ignore[no-untyped-call]
    return str(answer["warning"])


def test_only_the_patch_release_differs() -> None:
    text = _message({"python": "3.11.7.final.0"}, {"python": "3.11.2.final.0"})
    assert re.compile(_PATCH_ONLY, re.I).match(text)


@pytest.mark.parametrize(
    ("client", "image"),
    [
        ({"python": "3.12.1.final.0"}, {"python": "3.11.2.final.0"}),
        ({"python": "3.11.7.final.0", "dask": "1"}, {"python": "3.11.2.final.0", "dask": "2"}),
    ],
)
def test_any_other_difference_still_warns(client: dict[str, str], image: dict[str, str]) -> None:
    assert not re.compile(_PATCH_ONLY, re.I).match(_message(client, image))
