"""The Dask image's pieces: versions, the mismatch sentence, pip's arguments, the Dockerfile."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2prc.cluster import image
from p2prc.containers import images
from p2prc.errors import ClusterError, ContainerError, InvalidRequest

VERSIONS = {
    "python": "3.11",
    "dask": "2026.8.0",
    "distributed": "2026.8.0",
    "numpy": "2.4.6",
    "pandas": "3.1.1",
    "cloudpickle": "3.1.3",
    "msgpack": "1.2.4",
    "tornado": "6.6.1",
    "toolz": "1.2.0",
}


def test_local_versions_are_this_environments() -> None:
    versions = image.local_versions()
    assert set(versions) == {"python", *image.PACKAGES}
    assert versions["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert versions["distributed"] == importlib.metadata.version("distributed")
    assert image.dask_image_tag(versions) == (
        f"p2prc/dask:{versions['distributed']}-py{versions['python']}"
    )


def test_a_missing_dask_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name in ("dask", "distributed"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ClusterError, match=r"dask, distributed .*pip install 'p2prc\[dask\]'"):
        image.local_versions()


def test_equal_versions_have_no_mismatch() -> None:
    assert image.version_mismatch(VERSIONS, dict(VERSIONS)) is None


def test_the_mismatch_sentence_names_each_differing_package() -> None:
    other = {**VERSIONS, "numpy": "2.3.0", "python": "3.12"}
    del other["toolz"]
    sentence = image.version_mismatch(VERSIONS, other)
    assert sentence == (
        "Dask versions differ: python 3.11 here but 3.12 in the image; numpy 2.4.6 here but "
        "2.3.0 in the image; toolz 1.2.0 here but missing in the image (they must be equal)"
    )
    assert "no version label" in (image.version_mismatch(VERSIONS, None) or "")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dask", "2026.8.0; rm -rf /"),
        ("dask", "2026.8.0\nRUN id"),
        ("dask", '2026.8.0" LABEL x="y'),
        ("dask", "1.0+local"),
        ("dask", "1!2.0"),
        ("dask", ">=1.0"),
        ("dask", ""),
        ("dask", "latest"),
        ("numpy", "2.4.6 --index-url http://evil"),
        ("pandas", "3.1.1 "),
        ("python", "3"),
        ("python", "3.11.7"),
        ("python", "2.7"),
    ],
)
def test_odd_version_strings_are_refused(name: str, value: str) -> None:
    with pytest.raises(InvalidRequest, match="not a"):
        image.dockerfile({**VERSIONS, name: value})
    with pytest.raises(InvalidRequest):
        image.pip_command({**VERSIONS, name: value}, wheels=Path("/w"))


def test_prereleases_and_post_releases_are_versions() -> None:
    for value in ("2024.1.0rc1", "1.26.4.post1", "3.0.0.dev2", "2.0b3"):
        assert f"dask=={value}" in image.pip_command({**VERSIONS, "dask": value}, wheels=Path("/w"))


def test_missing_or_unknown_packages_are_refused() -> None:
    lacking = {k: v for k, v in VERSIONS.items() if k != "pandas"}
    with pytest.raises(InvalidRequest, match="missing \\['pandas'\\]"):
        image.dask_image_tag(lacking)
    with pytest.raises(InvalidRequest, match="unknown \\['scipy'\\]"):
        image.dask_image_tag({**VERSIONS, "scipy": "1.0"})


def test_platform_tags_per_architecture() -> None:
    x86 = image.manylinux_platforms("x86_64")
    assert x86[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= set(x86)
    assert not any("2_37" in tag or "2_16" in tag for tag in x86)
    assert image.manylinux_platforms("arm64") == image.manylinux_platforms("aarch64")
    assert all(tag.endswith("_aarch64") for tag in image.manylinux_platforms("aarch64"))
    for machine in ("armv7l", "riscv64", "ppc64le", "i686", ""):
        with pytest.raises(ClusterError, match="x86_64 and aarch64 only"):
            image.manylinux_platforms(machine)


def test_pip_download_arguments() -> None:
    command = image.pip_command(VERSIONS, wheels=Path("/cache/wheels"), machine="aarch64")
    assert command[:6] == [sys.executable, "-m", "pip", "download", "--dest", "/cache/wheels"]
    assert "--only-binary=:all:" in command
    pairs = list(itertools.pairwise(command))
    assert ("--python-version", "3.11") in pairs
    assert ("--implementation", "cp") in pairs
    assert ("--abi", "cp311") in pairs
    assert ("--platform", "manylinux2014_aarch64") in pairs
    assert ("--platform", "manylinux_2_17_aarch64") in pairs
    assert "--no-index" not in command
    assert command[-len(image.PACKAGES) :] == [f"{n}=={VERSIONS[n]}" for n in image.PACKAGES]


def test_pip_install_arguments_use_the_cache_alone() -> None:
    command = image.pip_command(
        VERSIONS, wheels=Path("/cache/wheels"), target=Path("/ctx/site"), machine="x86_64"
    )
    assert command[3:9] == [
        "install",
        "--target",
        "/ctx/site",
        "--no-index",
        "--find-links",
        "/cache/wheels",
    ]
    assert ("--platform", "manylinux_2_28_x86_64") in list(itertools.pairwise(command))


def test_dockerfile_copies_the_site_and_labels_the_versions() -> None:
    text = image.dockerfile(VERSIONS)
    lines = text.splitlines()
    assert "FROM p2prc/sshd:latest" in lines
    assert "COPY site /opt/dask/site" in lines
    assert "COPY bin /opt/dask/bin" in lines
    label = next(line for line in lines if line.startswith("LABEL "))
    quoted = label.split(f"{image.VERSIONS_LABEL}=", 1)[1]
    assert json.loads(json.loads(quoted)) == VERSIONS
    assert 'org.p2prc.image="dask"' in label


def test_the_wrappers_run_the_images_python_on_the_site(tmp_path: Path) -> None:
    (tmp_path / "site" / "bin").mkdir(parents=True)
    (tmp_path / "site" / "bin" / "dask").write_text("#!/host/python\n")
    (tmp_path / "site" / "mod.py").write_text("")
    image._write_context(tmp_path, VERSIONS)
    dask = (tmp_path / "bin" / "dask").read_text()
    assert dask.startswith("#!/bin/sh\n")
    assert "export PYTHONPATH=/opt/dask/site" in dask
    assert 'exec python3 -m dask "$@"' in dask
    assert (tmp_path / "bin" / "dask").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "site" / "mod.py").stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "site" / "bin").exists()
    assert (tmp_path / "Dockerfile").read_text() == image.dockerfile(VERSIONS)


def test_an_empty_wheel_cache_downloads_then_installs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "wheel_cache", lambda: tmp_path / "wheels")
    offline: list[list[str]] = []
    ran: list[list[str]] = []

    def quiet(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        offline.append(command)
        return subprocess.CompletedProcess(command, 1, "", "No matching distribution")

    monkeypatch.setattr(subprocess, "run", quiet)
    monkeypatch.setattr(images, "_run", lambda command, what: ran.append(command))
    image._fill_site(VERSIONS, tmp_path / "site")
    assert offline[0][3:5] == ["install", "--target"]
    assert [command[3] for command in ran] == ["download", "install"]
    assert ran[1] == offline[0]


def test_a_failing_pip_is_a_cluster_error_naming_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image, "wheel_cache", lambda: tmp_path / "wheels")
    monkeypatch.setattr(
        subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1, "", "")
    )

    def fail(command: list[str], what: str) -> None:
        raise ContainerError(f"{what} failed (1): ERROR: No matching distribution for dask")

    monkeypatch.setattr(images, "_run", fail)
    with pytest.raises(ClusterError, match=r"pip download for the Dask image failed.*dask"):
        image._fill_site(VERSIONS, tmp_path / "site")


def test_concurrent_ensures_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "wheel_cache", lambda: tmp_path / "wheels")
    built: list[str] = []

    def build(tag: str, versions: dict[str, str]) -> None:
        time.sleep(0.3)
        built.append(tag)

    monkeypatch.setattr(image, "_current", lambda tag, versions: bool(built))
    monkeypatch.setattr(image, "_build_dask_image", build)
    threads = [
        threading.Thread(target=image.ensure_dask_image, kwargs={"versions": VERSIONS})
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    assert image.ensure_dask_image(versions=VERSIONS) == "p2prc/dask:2026.8.0-py3.11"
    for thread in threads:
        thread.join()
    assert built == ["p2prc/dask:2026.8.0-py3.11"]
