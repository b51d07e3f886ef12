import p2prc

_MODULES = {"api", "cli", "client", "cluster", "config", "errors", "identity", "models", "node"}
_MODULES |= {"containers", "dask", "jobs", "peers", "plugins", "specs", "state", "trust", "tunnel"}
_MODULES |= {"attach", "direct", "install"}


def test_all_is_sorted_and_exact() -> None:
    public = {name for name in vars(p2prc) if not name.startswith("_") or name == "__version__"}
    assert p2prc.__all__ == sorted(p2prc.__all__)
    assert sorted(public - _MODULES) == p2prc.__all__


def test_every_exported_name_resolves() -> None:
    for name in p2prc.__all__:
        assert getattr(p2prc, name) is not None
