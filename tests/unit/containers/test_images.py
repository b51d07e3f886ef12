"""Images with extra Debian packages: names checked, the commands built, no Docker needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from p2prc.cli import main
from p2prc.containers import images
from p2prc.errors import ContainerError, InvalidRequest


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_package_names_are_sorted_deduplicated_and_skip_the_defaults() -> None:
    assert images.package_names("povray, imagemagick,povray,,python3") == [
        "imagemagick",
        "povray",
    ]
    assert images.package_names(["libstdc++6", "g++", "python3.11", "fonts-dejavu-core"]) == [
        "fonts-dejavu-core",
        "g++",
        "libstdc++6",
        "python3.11",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "povray;rm -rf /",
        "$(reboot)",
        "povray imagemagick",
        "--no-check-gpg",
        "-x",
        "PovRay",
        "a",
        "povray=1:3.7",
        "../etc",
        "pkg/other",
        "x" * 101,
        "pov\nray",
        "pov\tray",
    ],
)
def test_package_names_refuse_anything_but_debian_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="not a Debian package name"):
        images.package_names([name])


def test_too_many_packages() -> None:
    with pytest.raises(InvalidRequest, match="at most 64"):
        images.package_names([f"pkg{i}" for i in range(65)])


def test_debootstrap_command_has_the_defaults_and_the_extras(tmp_path: Path) -> None:
    command = images.debootstrap_command(
        tmp_path / "root", "http://deb.debian.org/debian", ["povray", "imagemagick"]
    )
    assert command[:2] == ["debootstrap", "--variant=minbase"]
    include = command[2].removeprefix("--include=").split(",")
    assert include[: len(images._PACKAGES)] == images._PACKAGES
    assert include[len(images._PACKAGES) :] == ["imagemagick", "povray"]
    assert command[3:] == ["bookworm", str(tmp_path / "root"), "http://deb.debian.org/debian"]
    assert images.debootstrap_command(tmp_path, "http://m/debian")[2] == (
        f"--include={','.join(images._PACKAGES)}"
    )


def test_debootstrap_command_refuses_a_mirror_that_is_not_a_url(tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="not a mirror URL"):
        images.debootstrap_command(tmp_path, "--keyring=/tmp/x")
    with pytest.raises(InvalidRequest):
        images.debootstrap_command(tmp_path, "http://m/debian", ["bad;name"])


@pytest.mark.parametrize(
    ("tag", "base"),
    [
        ("p2prc/render:latest", "p2prc/render-base:latest"),
        ("lab/render", "lab/render-base:latest"),
        ("localhost:5000/lab/render", "localhost:5000/lab/render-base:latest"),
        ("localhost:5000/lab/render:3.7", "localhost:5000/lab/render-base:3.7"),
    ],
)
def test_base_tag_for(tag: str, base: str) -> None:
    assert images.base_tag_for(tag) == base


@pytest.mark.parametrize("tag", ["Bad/Name", "a b", "x;y", "lab/render@sha256:" + "0" * 64, ""])
def test_base_tag_for_refuses_bad_tags(tag: str) -> None:
    with pytest.raises(InvalidRequest):
        images.base_tag_for(tag)


class FakeDocker:
    """The Docker-facing steps of ensure_package_image, recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, labels: dict[str, dict[str, str]]):
        self.labels = labels
        self.calls: list[tuple[Any, ...]] = []
        monkeypatch.setattr(images, "_labels", lambda tag: dict(self.labels.get(tag, {})))
        monkeypatch.setattr(images, "bootstrap_base", self.bootstrap)
        monkeypatch.setattr(images, "build_default_image", self.build)

    def bootstrap(self, tag: str, *, packages: list[str]) -> None:
        self.calls.append(("bootstrap", tag, packages))
        self.labels[tag] = {images._PACKAGES_LABEL: ",".join(packages)}

    def build(self, base: str, tag: str) -> None:
        self.calls.append(("build", base, tag))
        self.labels[tag] = {**self.labels[base], images._VERSION_LABEL: images.IMAGE_VERSION}


def test_ensure_package_image_builds_then_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDocker(monkeypatch, {})
    tag = "p2prc/render:latest"
    assert images.ensure_package_image(tag, ["povray", "imagemagick"]) == "offline"
    assert fake.calls == [
        ("bootstrap", "p2prc/render-base:latest", ["imagemagick", "povray"]),
        ("build", "p2prc/render-base:latest", tag),
    ]
    fake.calls.clear()
    assert images.ensure_package_image(tag, ["imagemagick", "povray"]) == "present"
    assert fake.calls == []
    # Other packages: a new base; an old sshd layer: only that layer again.
    assert images.ensure_package_image(tag, ["povray"]) == "offline"
    assert fake.calls[0] == ("bootstrap", "p2prc/render-base:latest", ["povray"])
    fake.calls.clear()
    fake.labels[tag][images._VERSION_LABEL] = "1"
    assert images.ensure_package_image(tag, ["povray"]) == "updated"
    assert fake.calls == [("build", "p2prc/render-base:latest", tag)]
    fake.calls.clear()
    assert images.ensure_package_image(tag, ["povray"], force=True) == "offline"
    assert [call[0] for call in fake.calls] == ["bootstrap", "build"]


def test_ensure_package_image_reuses_a_matching_base(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {images._PACKAGES_LABEL: "povray"}
    fake = FakeDocker(monkeypatch, {"lab/r-base:1": base})
    assert images.ensure_package_image("lab/r:1", ["povray"]) == "offline"
    assert fake.calls == [("build", "lab/r-base:1", "lab/r:1")]


@pytest.mark.parametrize(
    ("tag", "packages", "message"),
    [
        ("p2prc/sshd:latest", ["povray"], "keeps the default packages"),
        ("lab/r:1", [], "name the extra packages"),
        ("lab/r:1", ["python3"], "name the extra packages"),
        ("lab/r:1", ["povray`id`"], "not a Debian package name"),
    ],
)
def test_ensure_package_image_refuses(
    monkeypatch: pytest.MonkeyPatch, tag: str, packages: list[str], message: str
) -> None:
    fake = FakeDocker(monkeypatch, {})
    with pytest.raises(InvalidRequest, match=message):
        images.ensure_package_image(tag, packages)
    assert fake.calls == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--packages", "povray"], "needs --tag NAME"),
        (["--pull", "--packages", "povray", "--tag", "lab/r:1"], "builds offline"),
        (["--tag", "lab/r:1"], "--tag needs --packages"),
        (["--packages", "povray;id", "--tag", "lab/r:1"], "not a Debian package name"),
    ],
)
def test_cli_refuses_before_building(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    fake = FakeDocker(monkeypatch, {})
    code, _, err = run(capsys, "--home", str(tmp_path), "images", "bootstrap", *args)
    assert code != 0
    assert message in err
    assert fake.calls == []


def test_cli_builds_and_prints_how_to_offer_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeDocker(monkeypatch, {})
    home = ["--home", str(tmp_path / "home")]
    assert run(capsys, *home, "init")[0] == 0
    args = ["images", "bootstrap", "--offline", "--packages", "povray", "--tag", "lab/r:1"]
    code, out, _ = run(capsys, *home, "--json", *args)
    assert code == 0
    assert json.loads(out) == {"image": "lab/r:1", "how": "offline", "offered": False}
    code, out, _ = run(capsys, *home, *args)
    assert "offer it: p2prc config set containers.images" in out
    assert '["p2prc/sshd:latest", "lab/r:1"]' in out
    assert run(capsys, *home, "config", "set", "containers.images", '["lab/r:1"]')[0] == 0
    code, out, _ = run(capsys, *home, "--json", *args)
    assert json.loads(out) == {"image": "lab/r:1", "how": "present", "offered": True}
    assert [call[0] for call in fake.calls] == ["bootstrap", "build"]
