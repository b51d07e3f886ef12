"""Direct paths between nodes (#18): TLS pinned by node id, beside the relay.

``link``: one direct connection (handshake, streams both ways, heartbeat); ``paths``:
``node.paths``, which finds, adopts and keeps one per peer; ``listener``: the direct port.
"""
