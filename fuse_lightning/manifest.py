"""The `manifest.json` of a protected set: sha256 of every file, written on export, checked on read.

A protected directory holds exactly the files its manifest lists: a file that is missing, changed
or not listed makes `verify_manifest` fail with a message naming it. Readers (the DataModules'
`protected_dir`) verify by default; `fuse verify DIR` runs the same check from the shell.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["ManifestError", "content_fingerprint", "find_manifest", "sha256_file", "verify_manifest",
           "write_manifest"]

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A protected set does not match its manifest (or has none)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Relative posix paths of every file under `directory` except the manifest itself."""
    files = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(rel for rel in files if rel != MANIFEST_NAME)


def write_manifest(directory: Path, manifest: dict[str, Any], exclude: tuple[str, ...] = ()) -> Path:
    """Add sha256 of every file under `directory` to `manifest` and write `manifest.json`.

    Args:
        directory: The directory to describe.
        manifest: Entries to store beside `files`.
        exclude: Relative paths to leave out.

    Returns:
        The manifest path.
    """
    files = {rel: sha256_file(directory / rel) for rel in _listed_files(directory) if rel not in exclude}
    target = directory / MANIFEST_NAME
    target.write_text(json.dumps({**manifest, "files": files}, indent=2, sort_keys=False, default=str))
    return target


def find_manifest(directory: str | os.PathLike) -> Path:
    """The directory holding the manifest of `directory`: itself, or its parent.

    A reader may be pointed at the dataset's own sub-directory (e.g. `<out>/cifar-10-batches-py`);
    the export's manifest then lies one level up.

    Raises:
        ManifestError: Neither holds a `manifest.json`.
    """
    directory = Path(directory)
    for candidate in (directory, directory.parent):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    raise ManifestError(
        f"{directory} has no {MANIFEST_NAME}: it was not written by `fuse protect`/`fuse baseline`, "
        f"or the manifest was removed. Re-export it, or skip the check with "
        f"--data.init_args.verify_manifest false if you trust the files"
    )


def content_fingerprint(directory: str | os.PathLike, length: int = 16) -> str | None:
    """A short fingerprint of a protected set's contents: equal for two sets exactly when every file
    listed in their manifests has the same path and sha256.

    Unlike the manifest's own hash it ignores the metadata (creation time, timings), so a set made
    again by the same command has the same fingerprint only if it is byte-identical. Sweeps record
    it with every victim run, which tells runs on a remade set from runs on the first one.

    Args:
        directory: The protected directory (or the dataset directory inside it).
        length: Hex characters kept.

    Returns:
        The fingerprint, or None when there is no readable manifest with a `files` mapping.
    """
    try:
        manifest = json.loads((find_manifest(directory) / MANIFEST_NAME).read_text())
        files = manifest["files"]
    except (ManifestError, OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    canonical = json.dumps(sorted(files.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _safe_relative(rel: str, manifest_path: Path) -> str:
    """Refuse manifest entries that point outside the directory (absolute paths, `..`)."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ManifestError(f"{manifest_path}: entry {rel!r} points outside the protected directory")
    return rel


def verify_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a protected directory against its `manifest.json`.

    Args:
        directory: The protected directory (or the dataset directory inside it).

    Returns:
        The manifest.

    Raises:
        ManifestError: No manifest, an unreadable one, or a file missing, changed or not listed
            (the message names the file).
    """
    root = find_manifest(directory)
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{manifest_path} is not a valid manifest ({err})") from None
    for rel in listed:
        _safe_relative(rel, manifest_path)
    extra = sorted(set(_listed_files(root)) - set(listed))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ManifestError(f"{root}: files not in {manifest_path}: {shown}; remove them or re-export")
    for rel, digest in listed.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise ManifestError(f"{path} is listed in {manifest_path} but missing (or not a plain file)")
        if sha256_file(path) != digest:
            raise ManifestError(f"{path} does not match the sha256 recorded in {manifest_path}")
    return manifest


def verify_main(argv: list[str]) -> int:
    """`fuse verify DIR [DIR ...]`: check protected sets against their manifests.

    Args:
        argv: Command-line arguments after `verify`.

    Returns:
        0 when every directory matches, 1 otherwise (one line per failing directory).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="fuse verify",
        description="Check protected datasets against their manifest.json (sha256 of every file).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="protected directory written by fuse protect/baseline")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.dirs:
        try:
            manifest = verify_manifest(directory)
        except (ManifestError, OSError) as err:
            print(f"fuse verify: FAILED: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"fuse verify: OK: {directory} ({len(manifest['files'])} files match {MANIFEST_NAME})")
    return status
