"""The checked-in OpenAPI document is what the code serves (the binding surface)."""

import json
from pathlib import Path

from p2prc._openapi import openapi_document

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_checked_in_openapi_matches_the_code() -> None:
    checked_in = json.loads(DOCUMENT.read_text())
    assert checked_in == openapi_document(), "the API changed: run scripts/openapi and commit"


def test_every_state_changing_route_is_documented_as_signed() -> None:
    document = openapi_document()
    assert "P2PRC-Signature" in document["info"]["description"]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if method in ("post", "put", "patch", "delete"):
                assert operation["responses"], f"{method.upper()} {path} documents no answer"
