"""``p2prc ui``: open the node's web dashboard with a one-time login link."""

import asyncio
import webbrowser
from typing import Annotated

import typer

from ..client import AsyncClient
from ._common import Options, emit, err, options_of

__all__ = ["login_url", "ui_command"]


async def login_url(options: Options) -> tuple[str, float]:
    """A fresh one-time login link to the local node's dashboard, and its seconds to live."""
    from ..api.ui import UiLogin  # the server's modules, loaded only by this command

    async with AsyncClient(home=options.home) as client:
        login = await client._call("POST", "/ui/login-token", UiLogin)
        return f"{client.base_url}{login.path}", login.expires_in


def ui_command(
    ctx: typer.Context,
    print_url: Annotated[
        bool, typer.Option("--print-url", help="Print the login link instead of opening it.")
    ] = False,
) -> None:
    """Open this node's web dashboard in a browser (the link logs you in once)."""
    options = options_of(ctx)
    url, expires_in = asyncio.run(login_url(options))
    data = {"url": url, "expires_in": expires_in}
    if print_url or options.json:
        emit(options, data, url)
        return
    if not webbrowser.open(url):
        err.print("could not start a browser; open this link (it works once, for a minute):")
        emit(options, data, url)
        return
    emit(options, data, f"opened the dashboard in your browser (link valid once: {url})")
