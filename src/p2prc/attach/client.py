"""The library side of attached hosts: ``client.attached`` (an ``AttachedAPI``) over
``/attached``.

Usage::

    async with AsyncClient(home=home) as client:
        host = await client.attached.attach("morello", host="192.168.0.10", ports=[8080])
        for host in await client.attached.list():
            print(host.name, [gateway.name for gateway in host.gateways])
        await client.attached.detach("morello")

``Client.attached`` gives the blocking twin, ``BlockingAttachedAPI``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
from typing import Any

import httpx
from pydantic import ValidationError

from .._client_async import AsyncClient, _model_of, _raise_for_error, _validate, _validate_list
from ..errors import InvalidRequest, PeerProtocolError, validation_message
from ..jobs.client import _blocking, _Twin
from .models import AllowChange, AttachedHost, AttachRequest
from .records import MAX_ATTACHED_BYTES, NAME

__all__ = ["MAX_RECORDS", "MAX_RECORDS_BYTES", "AttachedAPI", "BlockingAttachedAPI"]

# What one gateway may answer to GET /attached/records.
MAX_RECORDS = 32
MAX_RECORDS_BYTES = 64 * 1024
# Attaching dials the host, reads its banner and its specs over SSH: reads wait longer.
_SLOW = httpx.Timeout(60.0, connect=10.0)


def _path(name: str, *rest: str) -> str:
    if not NAME.match(name):
        raise InvalidRequest(f"{name!r} is not an attached host name")
    return "/".join(["/attached", name, *rest])


class AttachedAPI:
    """Attached hosts as the node ``client`` talks to sees them (changes signed by its owner)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def attach(self, /, request: AttachRequest | None = None, **fields: Any) -> AttachedHost:
        """``POST /attached``: attach a host on this gateway (``name=``, ``host=``, ...)."""
        request = _model_of(AttachRequest, request, fields)
        return await self._send("POST", "/attached", request.model_dump(mode="json"))

    async def list(self) -> builtins.list[AttachedHost]:
        """``GET /attached``: every attached host this node knows, merged over gateways."""
        response = await self._client._request("GET", "/attached")
        return _validate_list(AttachedHost, response, self._client.base_url)

    async def own(self) -> builtins.list[AttachedHost]:
        """``GET /attached/own``: the hosts this gateway attached, with their LAN rows."""
        response = await self._client._request("GET", "/attached/own", signed=True)
        return _validate_list(AttachedHost, response, self._client.base_url)

    async def get(self, name: str) -> AttachedHost:
        """``GET /attached/NAME``: one attached host (``AttachedNotFound`` if none)."""
        path = _path(name)
        response = await self._client._request("GET", path)
        return _validate(AttachedHost, response, f"{self._client.base_url}{path}")

    async def detach(self, name: str) -> None:
        """``DELETE /attached/NAME``: this gateway stops reaching the host."""
        await self._client._request("DELETE", _path(name), signed=True)

    async def allow(
        self,
        name: str,
        add: builtins.list[str] | None = None,
        remove: builtins.list[str] | None = None,
    ) -> AttachedHost:
        """``PUT /attached/NAME/allow``: add keys to, and remove keys from, its allow list."""
        try:
            body = AllowChange(add=add or [], remove=remove or []).model_dump()
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        return await self._send("PUT", _path(name, "allow"), body)

    async def records(self) -> builtins.list[bytes]:
        """``GET /attached/records``: the node's own signed records, still encoded (not yet
        verified); at most ``MAX_RECORDS``, the answer at most ``MAX_RECORDS_BYTES``."""
        client = self._client
        where = f"{client.base_url}/attached/records"
        with client._transport_errors():
            async with client._http.stream("GET", "/attached/records") as response:
                body = bytearray()
                if response.status_code < 400:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RECORDS_BYTES:
                            raise PeerProtocolError(f"{where}: more than {MAX_RECORDS_BYTES} bytes")
                else:
                    await response.aread()
        if response.status_code >= 400:
            _raise_for_error(response)
        return _records_of(bytes(body), where)

    async def _send(self, method: str, path: str, body: Any) -> AttachedHost:
        return await self._client._call(
            method, path, AttachedHost, body, signed=True, http_timeout=_SLOW
        )


def _records_of(body: bytes, where: str) -> builtins.list[bytes]:
    try:
        value = json.loads(body)
        items = value["records"]
        if not isinstance(items, builtins.list) or len(items) > MAX_RECORDS:
            raise ValueError(f"expected at most {MAX_RECORDS} records")
        limit = (MAX_ATTACHED_BYTES + 2) // 3 * 4
        if not all(isinstance(item, str) and len(item) <= limit for item in items):
            raise ValueError("a record is not base64 text of a record's size")
        return [base64.b64decode(item, validate=True) for item in items]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise PeerProtocolError(f"{where}: unexpected answer: {exc}") from None


class BlockingAttachedAPI(_Twin["AttachedAPI"]):
    """The blocking twin of ``AttachedAPI`` (``Client.attached``)."""

    attach = _blocking(AttachedAPI.attach)
    list = _blocking(AttachedAPI.list)
    own = _blocking(AttachedAPI.own)
    get = _blocking(AttachedAPI.get)
    detach = _blocking(AttachedAPI.detach)
    allow = _blocking(AttachedAPI.allow)
    records = _blocking(AttachedAPI.records)
