"""The original P2PRC flags, translated by one table into modern commands before parsing.

``p2prc --touch 10.0.0.7:8088 -p 2`` becomes ``p2prc container create 10.0.0.7:8088
--ports 2``; the typer app never sees an original flag, so they stay out of ``--help``
(``p2prc help legacy`` lists them). The global options ``--json``, ``--debug`` and
``--home DIR`` may stand anywhere before ``--``; they are moved in front of the command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidRequest

__all__ = ["LEGACY", "Legacy", "move_globals", "normalise", "translate"]

_Values = dict[str, str | bool]


@dataclass(frozen=True, slots=True)
class Legacy:
    """One original flag: its spellings, whether it takes a value, what it becomes."""

    names: tuple[str, ...]
    value: str = ""  # the value's name, or "" for a switch
    becomes: str = ""  # the modern command, for `p2prc help legacy`
    build: Callable[[_Values], list[str]] | None = None  # None: a modifier of another flag

    @property
    def key(self) -> str:
        return self.names[0]


def _get(values: _Values, key: str) -> str | None:
    value = values.get(key)
    return value if isinstance(value, str) else None


def _with_port(host: str, port: str | None) -> str:
    return f"{host}:{port}" if port and port != "0" and ":" not in host else host


def _touch(values: _Values) -> list[str]:
    argv = ["container", "create", str(values["--touch"])]
    for legacy, modern in (("-p", "--ports"), ("--cn", "--name"), ("--bi", "--image")):
        if (value := _get(values, legacy)) is not None:
            argv += [modern, value]
    return argv + (["--gpu"] if values.get("--gpu") else [])


def _remove(values: _Values) -> list[str]:
    container = _get(values, "--id")
    if not container:
        raise InvalidRequest("provide the container id with --id")
    return ["container", "rm", container]


def _root_node(values: _Values) -> list[str]:
    ip, port = _get(values, "--ip"), _get(values, "-p")
    if not ip or not port or port == "0":
        raise InvalidRequest("--arn needs --ip IP and -p PORT")
    return ["peers", "add", _with_port(ip, port)]


def _group(values: _Values) -> list[str]:
    group, container = str(values["--group"]), _get(values, "--id")
    if container is None:
        return ["group", "show", group]
    return ["group", "rm" if values.get("--rmcgroup") else "add", group, container]


def _plugin(values: _Values) -> list[str]:
    target = _get(values, "--id")
    if not target:
        raise InvalidRequest("provide the container or group id with --id")
    return ["plugin", "run", str(values["--plugin"]), target]


def _map_port(values: _Values) -> list[str]:
    argv = ["map-port", str(values["--mp"])]
    for legacy, modern in (("--dn", "--domain"), ("--ra", "--remote")):
        if (value := _get(values, legacy)) is not None:
            argv += [modern, value]
    return argv + (["--udp"] if values.get("--udp") else [])


def _generate(values: _Values) -> list[str]:
    module = _get(values, "--mod")
    return ["generate", str(values["--gen"]), *(["--module", module] if module else [])]


def _fixed(*argv: str) -> Callable[[_Values], list[str]]:
    return lambda values: list(argv)


def _valued(*argv: str, key: str) -> Callable[[_Values], list[str]]:
    return lambda values: [*argv, str(values[key])]


LEGACY: tuple[Legacy, ...] = (
    Legacy(("-s", "--Server"), becomes="start", build=_fixed("start")),
    Legacy(("--dc", "--SetDefaultConfig"), becomes="init", build=_fixed("init")),
    Legacy(("--vc", "--ViewConfig"), becomes="config show", build=_fixed("config", "show")),
    Legacy(("--ni", "--NetworkInterfaces"), becomes="interfaces", build=_fixed("interfaces")),
    Legacy(("--specs", "--Specification"), "ADDR", "specs ADDR", _valued("specs", key="--specs")),
    Legacy(("--vi", "--ViewImages"), "ADDR", "images ADDR", _valued("images", key="--vi")),
    Legacy(("--ls", "--ListServers"), becomes="peers list", build=_fixed("peers", "list")),
    Legacy(
        ("--as", "--AddServer"),
        "IP",
        "peers add IP[:PORT] (-p PORT)",
        lambda v: ["peers", "add", _with_port(str(v["--as"]), _get(v, "-p"))],
    ),
    Legacy(("--arn", "--AddRootNode"), becomes="peers add IP:PORT (--ip, -p)", build=_root_node),
    Legacy(("--us", "--UpdateServerList"), becomes="peers sync", build=_fixed("peers", "sync")),
    Legacy(
        ("--amd", "--AddMetaData"), "TEXT", "meta set TEXT", _valued("meta", "set", key="--amd")
    ),
    Legacy(
        ("--touch", "--CreateVM"),
        "ADDR",
        "container create ADDR (-p N, --gpu, --cn NAME, --bi IMAGE)",
        _touch,
    ),
    Legacy(("--rm", "--RemoveVM"), "ADDR", "container rm ID (--id ID)", _remove),
    Legacy(
        ("--tc", "--TrackedContainers"), becomes="container list", build=_fixed("container", "list")
    ),
    Legacy(("--cgroup", "--CreateGroup"), becomes="group create", build=_fixed("group", "create")),
    Legacy(
        ("--group", "--Group"),
        "GROUP",
        "group show GROUP | add GROUP ID (--id) | rm GROUP ID (--id --rmcgroup)",
        _group,
    ),
    Legacy(
        ("--rmgroup", "--RemoveGroup"),
        "GROUP",
        "group delete GROUP",
        _valued("group", "delete", key="--rmgroup"),
    ),
    Legacy(("--groups", "--Groups"), becomes="group list", build=_fixed("group", "list")),
    Legacy(("--vp", "--ViewPlugins"), becomes="plugin list", build=_fixed("plugin", "list")),
    Legacy(
        ("--pp", "--PullPlugin"),
        "SOURCE",
        "plugin pull SOURCE",
        _valued("plugin", "pull", key="--pp"),
    ),
    Legacy(
        ("--rp", "--RemovePlugin"), "NAME", "plugin rm NAME", _valued("plugin", "rm", key="--rp")
    ),
    Legacy(("--plugin", "--ExecutePlugin"), "NAME", "plugin run NAME ID (--id ID)", _plugin),
    Legacy(
        ("--mp", "--MAPPort"), "PORT", "map-port PORT (--dn DOMAIN, --ra PEER, --udp)", _map_port
    ),
    Legacy(("--gen", "--Generate"), "NAME", "generate NAME (--mod MODULE)", _generate),
    # Modifiers: they only change the command one of the flags above makes.
    Legacy(("-p", "--Ports"), "N", "with --touch, --as, --arn"),
    Legacy(("--gpu", "--UseGpu"), becomes="with --touch"),
    Legacy(("--cn", "--ContainerName"), "NAME", "with --touch"),
    Legacy(("--bi", "--BaseImage"), "IMAGE", "with --touch"),
    Legacy(("--id", "--ID"), "ID", "with --rm, --group, --plugin"),
    Legacy(("--ip", "--IPAddress"), "IP", "with --arn"),
    Legacy(("--rmcgroup", "--RemoveContainerGroup"), becomes="with --group --id"),
    Legacy(("--dn", "--DomainName"), "DOMAIN", "with --mp"),
    Legacy(("--ra", "--RemoteAddress"), "PEER", "with --mp"),
    Legacy(("--udp",), becomes="with --mp"),
    Legacy(("--mod", "--ModuleName"), "MODULE", "with --gen"),
)
_BY_NAME = {name: flag for flag in LEGACY for name in flag.names}
# Single-dash long flags the original accepted (`-ls`), rewritten to two dashes first.
_SINGLE_DASH = frozenset(name[2:] for name in _BY_NAME if name.startswith("--"))
_GLOBAL_SWITCHES = ("--json", "--debug")


def normalise(argv: list[str]) -> list[str]:
    """``-ls`` -> ``--ls``: the original took its long flags with one dash too.

    Only before ``--``: what follows is a command's own (``p2prc run -- ls -ls``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    front = [f"-{arg}" if arg[:1] == "-" and arg[1:] in _SINGLE_DASH else arg for arg in argv[:end]]
    return front + argv[end:]


def move_globals(argv: list[str]) -> list[str]:
    """``--json``, ``--debug`` and ``--home DIR`` from anywhere before ``--`` to the front."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            rest += argv[index:]
            break
        if arg in _GLOBAL_SWITCHES:
            front.append(arg)
        elif arg == "--home" and index + 1 < len(argv):
            front += argv[index : index + 2]
            index += 1
        elif arg.startswith("--home="):
            front.append(arg)
        else:
            rest.append(arg)
        index += 1
    return front + rest


def translate(argv: list[str]) -> list[str]:
    """The modern command line for ``argv`` (unchanged unless it uses original flags)."""
    argv = move_globals(normalise(argv))
    split = next((i for i, a in enumerate(argv) if not _is_global(argv, i)), len(argv))
    front, rest = argv[:split], argv[split:]
    if not rest or rest[0].partition("=")[0] not in _BY_NAME:
        return argv
    values = _parse(rest)
    commands = [_BY_NAME[name] for name in values if _BY_NAME[name].build is not None]
    if not commands:
        names = ", ".join(values)
        raise InvalidRequest(f"{names} only changes another original flag; see 'p2prc help legacy'")
    if len(commands) > 1:
        names = ", ".join(flag.key for flag in commands)
        raise InvalidRequest(f"one original command at a time, not {names}")
    build = commands[0].build
    assert build is not None
    return front + build(values)


def _is_global(argv: list[str], index: int) -> bool:
    arg = argv[index]
    if arg in _GLOBAL_SWITCHES or arg.startswith("--home="):
        return True
    if arg == "--home":
        return True
    return index > 0 and argv[index - 1] == "--home"


def _parse(argv: list[str]) -> _Values:
    """Original flags and their values, keyed by each flag's first spelling."""
    values: _Values = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, _, inline = arg.partition("=")
        flag = _BY_NAME.get(name)
        if flag is None:
            raise InvalidRequest(
                f"unexpected {arg!r} among original flags; see 'p2prc help legacy'"
            )
        if flag.value:
            if not inline:
                index += 1
                if index >= len(argv):
                    raise InvalidRequest(f"{name} needs {flag.value}")
                inline = argv[index]
            values[flag.key] = inline
        else:
            values[flag.key] = True
        index += 1
    return values
