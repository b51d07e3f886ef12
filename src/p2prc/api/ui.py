"""The web dashboard: static pages under /ui, a one-time login, and read-only JSON for them.

The owner's signed call ``POST /ui/login-token`` mints a one-time token; ``GET
/ui/login?token=...`` spends it and sets a session cookie (HttpOnly, SameSite=Strict,
Path=/ui). Only ``/ui/api/...`` reads the node, and only with that cookie; the pages
themselves hold no data. The API's signed calls are untouched.
"""

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict

from ..errors import AuthError
from .auth import Owner
from .overview import Overview, overview

__all__ = ["COOKIE", "Overview", "UiLogin", "UiSessions", "overview", "router"]

COOKIE = "p2prc_ui"
TOKEN_TTL = 60.0
SESSION_TTL = 12 * 3600.0
# Both tables are tiny: a person logs in a few times a day. When one is full the oldest
# entry goes, so nobody can fill it for good (minting needs the owner's key anyway).
MAX_TOKENS = 16
MAX_SESSIONS = 32
_STATIC = Path(__file__).resolve().parent.parent / "ui"
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The pages load only their own files; nothing may frame them or be posted anywhere.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class UiLogin(_Answer):
    """A one-time login link for the dashboard: a path on this node's API."""

    path: str
    expires_in: float


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class _Expiring:
    """Secrets kept as SHA-256 digests with an expiry; at most ``limit``, oldest dropped."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._entries: dict[bytes, float] = {}

    def add(self, secret: str, ttl: float) -> None:
        now = self._clock()
        self._prune(now)
        while len(self._entries) >= self._limit:
            del self._entries[min(self._entries, key=self._entries.__getitem__)]
        self._entries[_digest(secret)] = now + ttl

    def find(self, secret: str) -> bytes | None:
        """The stored digest equal to ``secret``'s; every entry is compared, in constant time."""
        self._prune(self._clock())
        wanted, found = _digest(secret), None
        for digest in list(self._entries):
            if hmac.compare_digest(digest, wanted):
                found = digest
        return found

    def pop(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self, now: float) -> None:
        for digest, expires in list(self._entries.items()):
            if expires <= now:
                del self._entries[digest]


class UiSessions:
    """One-time login tokens and the browser sessions they open, in memory only."""

    def __init__(
        self,
        *,
        token_ttl: float = TOKEN_TTL,
        session_ttl: float = SESSION_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_ttl = token_ttl
        self.session_ttl = session_ttl
        self._tokens = _Expiring(MAX_TOKENS, clock)
        self._sessions = _Expiring(MAX_SESSIONS, clock)

    def mint(self) -> str:
        """A new one-time login token."""
        token = secrets.token_urlsafe(32)
        self._tokens.add(token, self.token_ttl)
        return token

    def redeem(self, token: str) -> str | None:
        """Spend ``token`` and open a session (its id), or None for a used or unknown token."""
        digest = self._tokens.find(token)
        if digest is None:
            return None
        self._tokens.pop(digest)
        session = secrets.token_urlsafe(32)
        self._sessions.add(session, self.session_ttl)
        return session

    def valid(self, session: str) -> bool:
        """Whether ``session`` is a live session id."""
        return bool(session) and self._sessions.find(session) is not None

    def end(self, session: str) -> None:
        """Close a session (log out)."""
        digest = self._sessions.find(session)
        if digest is not None:
            self._sessions.pop(digest)


def _static() -> dict[str, bytes]:
    return {name: (_STATIC / name).read_bytes() for name in _FILES}


def router(node: object, sessions: UiSessions | None = None) -> APIRouter:
    """Routes under /ui: the pages, the login, and the JSON the pages read."""
    routes = APIRouter(tags=["ui"])
    sessions = sessions or UiSessions()
    files = _static()

    def page(name: str) -> Response:
        return Response(files[name], media_type=_FILES[name], headers=_HEADERS)

    def session_of(request: Request) -> str:
        session = request.cookies.get(COOKIE, "")
        if not sessions.valid(session):
            raise AuthError("not logged in to the dashboard; run 'p2prc ui' on the node's machine")
        return session

    # Out of the OpenAPI document: the dashboard is the node's own page, not API surface.
    @routes.post("/ui/login-token", include_in_schema=False)
    async def login_token(caller: Owner) -> UiLogin:
        """A one-time dashboard login link (owner only); it expires within a minute."""
        token = sessions.mint()
        return UiLogin(path=f"/ui/login?token={token}", expires_in=sessions.token_ttl)

    @routes.get("/ui/login", include_in_schema=False)
    async def login(
        request: Request, token: Annotated[str, Query(max_length=128)] = ""
    ) -> Response:
        session = sessions.redeem(token) if token else None
        if session is None:
            text = "This login link was used already or has expired; run 'p2prc ui' again.\n"
            return PlainTextResponse(text, status_code=401, headers=_HEADERS)
        answer = RedirectResponse("/ui/", status_code=303, headers=_HEADERS)
        answer.set_cookie(
            COOKIE,
            session,
            max_age=int(sessions.session_ttl),
            path="/ui",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return answer

    @routes.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        sessions.end(session_of(request))
        answer = Response(status_code=204, headers=_HEADERS)
        answer.delete_cookie(COOKIE, path="/ui")
        return answer

    @routes.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=307, headers=_HEADERS)

    @routes.get("/ui/", include_in_schema=False)
    async def index() -> Response:
        return page("index.html")

    @routes.get("/ui/app.js", include_in_schema=False)
    async def script() -> Response:
        return page("app.js")

    @routes.get("/ui/style.css", include_in_schema=False)
    async def style() -> Response:
        return page("style.css")

    @routes.get("/ui/api/overview", include_in_schema=False)
    async def read_overview(request: Request, response: Response) -> Overview:
        session_of(request)
        response.headers.update(_HEADERS)
        return overview(node)

    return routes
