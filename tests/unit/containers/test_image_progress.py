"""The steps of an image build reach ``p2prc images``: a spinner, or plain lines."""

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from p2prc.cli import main
from p2prc.containers import images
from p2prc.errors import ContainerError


class _Api:
    def __init__(self, chunks: list[Any]) -> None:
        self.chunks = chunks
        self.options: dict[str, Any] = {}

    def build(self, **options: Any) -> Any:
        self.options = options
        yield from self.chunks


class _Client:
    def __init__(self, chunks: list[Any]) -> None:
        self.api = _Api(chunks)


def test_build_reports_each_step() -> None:
    client = _Client(
        [
            {"stream": "Step 1/2 : FROM p2prc/base:bookworm\n"},
            {"stream": " ---> 0123456789ab\n"},
            "not a dict",
            {"stream": "Step 2/2 : LABEL a=b\n"},
            {"stream": "Successfully built 0123456789ab\n"},
        ]
    )
    seen: list[str] = []
    with images.reporting(seen.append):
        images._build(client, "lab/x:1", path="/ctx")
    assert seen == ["lab/x:1: Step 1/2 : FROM p2prc/base:bookworm", "lab/x:1: Step 2/2 : LABEL a=b"]
    assert client.api.options["tag"] == "lab/x:1"
    assert client.api.options["decode"] is True
    images._build(client, "lab/x:1", path="/ctx")  # no reporter: only the log


def test_a_failed_build_says_why() -> None:
    client = _Client([{"stream": "Step 1/1 : RUN false\n"}, {"error": "returned a non-zero code"}])
    with pytest.raises(ContainerError, match=r"docker build of lab/x:1 failed: returned a non"):
        images._build(client, "lab/x:1", path="/ctx")


def test_run_reports_lines_and_keeps_the_tail_for_errors() -> None:
    seen: list[str] = []
    # flush: a piped stdout is block-buffered, and the order of the two lines is the point.
    script = (
        "import sys; print('I: Retrieving', flush=True);"
        " print('E: no mirror', file=sys.stderr); exit(3)"
    )
    with images.reporting(seen.append), pytest.raises(ContainerError) as caught:
        images._run([sys.executable, "-c", script], "debootstrap")
    assert seen == ["debootstrap: I: Retrieving", "debootstrap: E: no mirror"]
    assert "failed (3)" in str(caught.value)
    assert "E: no mirror" in str(caught.value)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_images_build_prints_plain_steps_off_a_terminal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    json_flag: list[str],
) -> None:
    def fake_build(context: Path, tag: str) -> None:
        images._step(f"{tag}: Step 1/1 : FROM scratch")

    monkeypatch.setattr(images, "build_offered_image", fake_build)
    (tmp_path / "ctx").mkdir()
    home = str(tmp_path / "home")
    build = ["images", "build", "--dockerfile", str(tmp_path / "ctx"), "--tag", "lab/x:1"]
    with pytest.raises(SystemExit) as done:
        main([*json_flag, "--home", home, *build])
    assert done.value.code in (0, None)
    captured = capsys.readouterr()
    assert "lab/x:1: Step 1/1 : FROM scratch" in captured.err
    assert "Step" not in captured.out


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs Docker")
def test_a_real_build_streams_its_steps(tmp_path: Path) -> None:
    if not images.image_exists(images.BASE_OFFLINE):
        pytest.skip(f"needs {images.BASE_OFFLINE}")
    (tmp_path / "Dockerfile").write_text(f"FROM {images.BASE_OFFLINE}\nLABEL p2prc.test=1\n")
    seen: list[str] = []
    with images.reporting(seen.append):
        images.build_offered_image(tmp_path, "p2prc-test/progress:1")
    assert any("Step 2/2 : LABEL" in line for line in seen), seen
    assert images.image_exists("p2prc-test/progress:1")
    client = images._client()
    try:
        client.images.remove("p2prc-test/progress:1")
    finally:
        client.close()
