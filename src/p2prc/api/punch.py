"""``POST /direct/punch``: a trusted peer behind NAT asks this node to hole-punch with it."""

from fastapi import APIRouter

from ..direct.punch import PunchAnswer, PunchNode, PunchRequest, answer_punch
from .auth import KeyRate, Peer

__all__ = ["PUNCHES_PER_MINUTE", "PunchNode", "router"]

# Punches one key may ask for per minute (a path is retried every direct.retry = 60 s).
PUNCHES_PER_MINUTE = 6


def router(node: PunchNode) -> APIRouter:
    """The route under /direct/punch."""
    routes = APIRouter(tags=["direct"])
    asked = KeyRate(limit=PUNCHES_PER_MINUTE, window=60.0)

    @routes.post("/direct/punch")
    async def punch(body: PunchRequest, caller: Peer) -> PunchAnswer:
        """Start this node's half of a hole punch with the caller; answers at once.

        The caller gives its public address (as its relay saw it), its direct port and how
        long after receipt to start; this node answers with its own and, from then,
        connects to the caller's address from its direct port for a few seconds. Only a
        trusted caller in this node's peer table, one punch per peer at a time, at most
        six a minute per key; the connection is checked (TLS, node id, trust) before use.
        """
        asked.hit(caller.node_id)
        return answer_punch(node, caller.node_id, body)

    return routes
