"""``AsyncClient`` and ``Client``: the library API to a node's HTTP API.

Requests that change state are signed with the home's node key; errors come
back as the same exception classes the node raised::

    with p2prc.Client() as client:          # the node of this home
        print(client.status().node_id)
        print(client.specs().cpu.cores)

Each operation is written once, in ``AsyncClient`` (``_client_async``); the blocking
``Client`` is derived from it (``_client_sync``).
"""

from __future__ import annotations

from ._client_async import AsyncClient, ProgressCallback, is_address, local_api_url, peer_url
from ._client_sync import Client

__all__ = ["AsyncClient", "Client", "ProgressCallback", "is_address", "local_api_url", "peer_url"]
