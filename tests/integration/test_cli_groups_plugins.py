"""The original group and plugin flags through the real CLI and a real node process."""

import json
from pathlib import Path

from tests.integration.conftest import NodeProcess, p2prc

REPO = Path(__file__).resolve().parents[2]


def test_group_and_plugin_flags(running_node: NodeProcess) -> None:
    home = running_node.home
    group = json.loads(p2prc(home, "--json", "--cgroup").stdout)["id"]
    assert group.startswith("grp")
    listed = json.loads(p2prc(home, "--json", "--groups").stdout)
    assert [g["id"] for g in listed] == [group]
    shown = json.loads(p2prc(home, "--json", "--group", group).stdout)
    assert shown["containers"] == []
    missing = p2prc(home, "--group", group, "--id", "nope", check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("ContainerNotFound:")
    p2prc(home, "--rmgroup", group)
    assert json.loads(p2prc(home, "--json", "group", "list").stdout) == []

    p2prc(home, "--pp", str(REPO / "plugins" / "http-share"))
    plugins = json.loads(p2prc(home, "--json", "--vp").stdout)
    assert [p["name"] for p in plugins] == ["http-share"]
    no_target = p2prc(home, "--plugin", "http-share", check=False)
    assert no_target.stderr.startswith("InvalidRequest: provide the container or group id")
    bad = p2prc(home, "plugin", "run", "http-share", "grpmissing", "--var", "novalue", check=False)
    assert bad.stderr.startswith("InvalidRequest: --var takes key=value")
    p2prc(home, "--rp", "http-share")
    assert json.loads(p2prc(home, "--json", "plugin", "list").stdout) == []
