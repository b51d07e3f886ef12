import p2prc

_MODULES = {"api", "cli", "client", "cluster", "config", "errors", "identity", "models", "node"}
_MODULES |= {"containers", "dask", "jobs", "peers", "plugins", "specs", "state", "trust", "tunnel"}
_MODULES |= {"attach", "direct", "install"}


def test_all_is_sorted_and_exact() -> None:
    public = {name for name in dir(p2prc) if not name.startswith("_") or name == "__version__"}
    assert p2prc.__all__ == sorted(p2prc.__all__)
    assert sorted(public - _MODULES) == p2prc.__all__


def test_importing_the_package_loads_neither_the_node_nor_fastapi() -> None:
    """A CLI command (or the ProxyCommand of p2prc ssh) pays only for what it uses."""
    import subprocess
    import sys

    code = (
        "import sys, p2prc; print(sorted({'p2prc.node', 'fastapi', 'docker'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
    assert p2prc.Node.__name__ == "Node"  # and the names still resolve on first use


def test_every_exported_name_resolves() -> None:
    for name in p2prc.__all__:
        assert getattr(p2prc, name) is not None
