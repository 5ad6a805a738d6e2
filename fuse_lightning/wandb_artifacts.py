"""Protected sets as W&B artifacts, online and offline.

`log_protected_set(dir, name)` logs an exported protected set (the directory with its
`manifest.json`) as an artifact of type `protected-dataset`, with the manifest (sha256 of every
file, PSNR/SSIM, method, config) as the artifact's metadata. `fetch_protected_set(ref, dest)`
brings the files back and checks every sha256 of the manifest (`ManifestError` naming the file
on a mismatch).

Online, both are W&B's own calls: `run.log_artifact`, then `run.use_artifact(ref).download()` (or
`wandb.Api().artifact(ref)` without a run), so the consuming run shows up in the artifact's lineage.

Offline (`WANDB_MODE=offline`) there is no server to download from, and W&B assigns no version
(`Artifact.version` raises until the run is synced). What wandb 0.31 does keep locally:

* `add_dir` copies every file into W&B's staging area, `$WANDB_DATA_DIR/artifacts/staging/`
  (default `~/.local/share/wandb`), read-only, so later edits of the source cannot change the
  artifact. The copies stay there until `wandb sync` has uploaded them; after the upload W&B
  moves uploaded files to its artifact cache (`$WANDB_CACHE_DIR/artifacts/obj/md5/..`).
* `Artifact.manifest` then lists every file with its path in the artifact, its base64 md5,
  its size and the `local_path` of its staged copy (the same manifest goes into the artifact
  record of the run's `.wandb` file, which `wandb sync` uploads).

W&B itself keeps no name -> version table offline, so `log_protected_set` adds one line per
logged artifact to a small index, `$WANDB_DATA_DIR/fuse-lightning/offline-artifacts.jsonl`:
project, name, local version, W&B's digest, aliases, the artifact's metadata and W&B's manifest
entries. Offline, `fetch_protected_set` resolves the reference there, copies each entry's staged
copy (or, once synced, W&B's cached object with that md5) into `dest`, checks W&B's md5 and
size of each file, then the sha256 of every file listed in the copied `manifest.json` (which
must also equal the `files` of the artifact's metadata). The original protected directory is
never read. Local versions count distinct digests per project and name as the server does
(`v0`, `v1`, ...; the same files logged again keep their version), so `name:v0`, `name:latest`,
`name:<alias>` and `project/name:vN` all resolve offline. The versions the server assigns on
`wandb sync` follow the order of syncing and may differ. Offline resolution works on the
machine (and `$WANDB_DATA_DIR`) that logged the artifact; another machine needs the run synced
and then fetches online.

`wandb` is imported only inside the functions that need it: the package and every command work
without it installed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from fuse_lightning.manifest import MANIFEST_NAME, ManifestError, find_manifest, verify_manifest

__all__ = [
    "ARTIFACT_TYPE",
    "default_artifact_name",
    "fetch_protected_set",
    "log_protected_set",
    "offline_index_path",
]

ARTIFACT_TYPE = "protected-dataset"
INDEX_NAME = "offline-artifacts.jsonl"


# --------------------------------------------------------------------------------------------
# wandb, imported lazily
# --------------------------------------------------------------------------------------------


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("logging protected sets to W&B needs the wandb package: pip install wandb") from None
    return wandb


def _is_offline(run=None) -> bool:
    """Whether `run` (or, without one, this process' W&B settings) logs offline."""
    if run is not None:
        return bool(getattr(run, "offline", False)) or getattr(run.settings, "mode", "") in ("offline", "dryrun")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
        return True
    wandb = _import_wandb()
    try:  # `wandb offline` writes the mode to a settings file instead of the environment
        return wandb.setup().settings.mode in ("offline", "dryrun")
    except Exception:  # noqa: BLE001 - unreadable settings: assume online, the server call will tell
        return False


def _is_disabled(run=None) -> bool:
    if run is not None:
        return getattr(run.settings, "mode", "") == "disabled"
    return os.environ.get("WANDB_MODE", "").lower() == "disabled"


def default_artifact_name(protected_dir: str | os.PathLike) -> str:
    """Artifact name of an export: its directory's name (`<run dir>-protected` for `<run>/protected`).

    W&B names allow letters, digits, `-`, `_` and `.`; anything else becomes `-`.
    """
    path = Path(protected_dir).resolve()
    text = f"{path.parent.name}-{path.name}" if path.name == "protected" else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "protected-set"


# --------------------------------------------------------------------------------------------
# Offline index: name -> local version -> run file
# --------------------------------------------------------------------------------------------


def offline_index_path() -> Path:
    """The index of artifacts logged offline: `$WANDB_DATA_DIR/fuse-lightning/offline-artifacts.jsonl`."""
    from wandb import env

    return Path(env.get_data_dir()).expanduser() / "fuse-lightning" / INDEX_NAME


def _read_index(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut by a crash: skip it
            continue
    return entries


def _register_offline(run, artifact, name: str, aliases: Sequence[str]) -> str:
    """Give an artifact logged offline a local version and record its metadata and W&B's file entries."""
    path = offline_index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)  # versions stay unique across processes
        except (ImportError, OSError):  # pragma: no cover - no advisory locks here
            pass
        handle.seek(0)
        same = [e for e in _read_index(path) if e["project"] == run.project and e["name"] == name]
        version = next((e["version"] for e in same if e["digest"] == artifact.digest), None)
        if version is None:
            version = f"v{len({e['digest'] for e in same})}"
        entry = {
            "project": run.project, "name": name, "version": version, "digest": artifact.digest,
            "aliases": list(aliases), "run_id": run.id,
            "logged": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metadata": artifact.metadata,
            "entries": {path: {"digest": e.digest, "size": int(e.size), "local_path": e.local_path, "ref": e.ref}
                        for path, e in artifact.manifest.entries.items()},
        }
        handle.seek(0, os.SEEK_END)
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
    return f"{name}:{version}"


def _parse_ref(ref: str) -> tuple[str | None, str, str]:
    """`[entity/][project/]name[:version|alias]` -> (project, name, version or alias)."""
    path, _, tag = ref.partition(":")
    parts = path.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"artifact reference {ref!r} is not [entity/][project/]name[:version]")
    project = parts[-2] if len(parts) >= 2 else None
    return project, parts[-1], tag or "latest"


def _offline_entry(ref: str, project: str | None) -> dict[str, Any]:
    """The newest index entry that `ref` names."""
    ref_project, name, tag = _parse_ref(ref)
    project = ref_project or project
    entries = [e for e in _read_index(offline_index_path()) if e["name"] == name]
    if project is not None:
        entries = [e for e in entries if e["project"] == project]
    elif len({e["project"] for e in entries}) > 1:
        projects = sorted({e["project"] for e in entries})
        raise ValueError(f"artifact {name!r} was logged offline in several projects ({', '.join(projects)}); "
                         "pass project= or use project/name:version")
    if tag == "latest":
        picked = entries[-1:]
    elif re.fullmatch(r"v\d+", tag):
        picked = [e for e in entries if e["version"] == tag]
    else:
        by_alias = [e for e in entries if tag in e.get("aliases", ())]
        picked = [e for e in entries if e["digest"] == tag] or (
            [e for e in entries if by_alias and e["version"] == by_alias[-1]["version"]]
        )
    if not picked:
        where = f" in project {project!r}" if project else ""
        raise FileNotFoundError(
            f"no artifact {ref!r} was logged offline{where} (index {offline_index_path()}); "
            "offline, only artifacts logged on this machine with this WANDB_DATA_DIR resolve"
        )
    return picked[-1]


# --------------------------------------------------------------------------------------------
# Copy and verify
# --------------------------------------------------------------------------------------------


def _safe_rel(rel: str) -> str:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ManifestError(f"artifact entry {rel!r} points outside the protected directory")
    return rel


def _cached_object(digest: str, size: int) -> Path | None:
    """W&B's cached copy of a file with this md5 (where `wandb sync` moves staged files)."""
    try:
        from wandb.sdk.artifacts.artifact_file_cache import get_artifact_file_cache

        path, hit, _ = get_artifact_file_cache().check_digest_obj_path(digest, size)
    except Exception:  # noqa: BLE001 - a cache layout this version does not know: no hit
        return None
    return Path(path) if hit else None


def _copy_checked(source: Path, target: Path, rel: str, digest: str, size: int) -> None:
    """Copy one artifact file, checking W&B's md5 and size on the way."""
    md5 = hashlib.md5(usedforsecurity=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(1 << 20):
            md5.update(block)
            dst.write(block)
    target.chmod(0o644 & ~_umask())
    got = base64.b64encode(md5.digest()).decode()
    if got != digest or target.stat().st_size != size:
        raise ManifestError(
            f"{rel}: the local copy {source} does not match the md5/size W&B recorded for the artifact "
            f"(expected {digest}, {size} bytes; got {got}, {target.stat().st_size} bytes)"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _materialize_offline(entries: dict[str, dict[str, Any]], target_dir: Path) -> None:
    for rel, entry in entries.items():
        if entry.get("ref"):
            raise ManifestError(f"{rel}: reference entries ({entry['ref']}) are not protected-set files")
        staged = Path(entry["local_path"]) if entry["local_path"] else None
        source = staged if staged is not None and staged.is_file() else _cached_object(entry["digest"], entry["size"])
        if source is None:
            raise ManifestError(
                f"{rel}: neither W&B's staged copy ({staged}) nor its artifact cache holds this file; "
                f"if the run was synced, fetch the artifact online"
            )
        _copy_checked(source, target_dir / _safe_rel(rel), rel, entry["digest"], entry["size"])


def _verify_fetched(directory: Path, metadata: dict[str, Any], ref: str) -> dict[str, Any]:
    """sha256 of every file of the copied manifest.json, which must match the artifact's metadata."""
    if not (directory / MANIFEST_NAME).is_file():
        raise ManifestError(f"artifact {ref} holds no {MANIFEST_NAME}: it is not a protected set")
    manifest = verify_manifest(directory)
    listed = metadata.get("files") if isinstance(metadata, dict) else None
    if listed is not None and listed != manifest["files"]:
        changed = sorted(k for k in set(listed) | set(manifest["files"]) if listed.get(k) != manifest["files"].get(k))
        raise ManifestError(
            f"artifact {ref}: {MANIFEST_NAME} does not match the sha256 list in the artifact's metadata "
            f"(differs for {', '.join(changed[:5]) or 'the file list'})"
        )
    return manifest


def _same_set(dest: Path, metadata: dict[str, Any]) -> bool:
    """Whether `dest` already holds this protected set, verified."""
    try:
        manifest = verify_manifest(dest)
    except (ManifestError, OSError):
        return False
    return isinstance(metadata, dict) and metadata.get("files") == manifest["files"]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _metadata(value: Any) -> Any:
    """The manifest as artifact metadata: plain JSON, NaN/inf -> null (as W&B stores them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _metadata(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_metadata(v) for v in value]
    return value


def log_protected_set(
    protected_dir: str | Path,
    name: str,
    *,
    project: str | None = None,
    run=None,
    aliases: Sequence[str] = (),
) -> str:
    """Log <protected_dir> (with its manifest.json) as a W&B artifact of type "protected-dataset".

    The manifest (sha256 per file, PSNR/SSIM, method, config) becomes the artifact's metadata; the
    directory is verified against it first, so a damaged set is never logged. The fidelity and
    the reference also go to the run's summary (`protected_set/psnr`, `protected_set/ssim`,
    `protected_set/linf_uint8`, `protected_set/artifact`, ...).

    Args:
        protected_dir: An export of `fuse protect`, `fuse baseline` or `ProtectOnFitEnd`.
        name: Artifact name (letters, digits, `-`, `_`, `.`); see `default_artifact_name`.
        project: Project of the short run started when there is no run.
        run: The run to log with; default: the active `wandb.run`, else a short run of
            job type `protect` in `project`.
        aliases: Extra aliases (W&B adds `latest`).

    Returns:
        The artifact reference: online the qualified `entity/project/name:vN`; offline
        `name:vN` with the local version (module docstring).

    Raises:
        ManifestError: The directory does not match its manifest.
        RuntimeError: W&B is disabled (`WANDB_MODE=disabled`).
    """
    wandb = _import_wandb()
    root = find_manifest(protected_dir)
    manifest = verify_manifest(root)
    metadata = _metadata(manifest)
    active = run if run is not None else wandb.run
    if _is_disabled(active):
        raise RuntimeError("W&B is disabled (WANDB_MODE=disabled): the protected set cannot be logged")
    own = None
    if active is None:
        own = active = wandb.init(
            project=project, job_type="protect", name=f"log-{name}",
            config={k: metadata.get(k) for k in ("method", "mode", "eps_255", "format", "num_images") if k in metadata},
        )
    try:
        fidelity = metadata.get("fidelity") or {}
        artifact = wandb.Artifact(
            name, type=ARTIFACT_TYPE, metadata=metadata,
            description=f"{metadata.get('method', 'protected')} set, eps {metadata.get('eps_255')}/255, "
            f"PSNR {fidelity.get('psnr')}, SSIM {fidelity.get('ssim')}",
        )
        # "mutable": W&B copies the files to its staging area now (what offline resolution reads).
        artifact.add_dir(str(root), policy="mutable")
        logged = active.log_artifact(artifact, aliases=list(aliases))
        if _is_offline(active):
            reference = _register_offline(active, artifact, name, aliases)
        else:
            logged.wait()
            reference = logged.qualified_name
        active.summary.update({
            **{f"protected_set/{k}": v for k, v in fidelity.items()},
            "protected_set/method": metadata.get("method"),
            "protected_set/artifact": reference,
        })
    finally:
        if own is not None:
            own.finish()
    return reference


def fetch_protected_set(ref: str, dest: str | Path, *, project: str | None = None, run=None) -> Path:
    """Make the artifact's files available under dest and verify every sha256 of its manifest.json.

    Files are written to a temporary sibling of `dest` and moved into place only once verified.
    An existing `dest` that already holds this set (verified) is returned as is; any other
    existing `dest` is refused.

    Args:
        ref: `name:vN`, `name:alias`, `project/name:vN` or `entity/project/name:vN` (no tag:
            `latest`).
        dest: Directory to hold the protected set.
        project: Project of `ref` when it names none.
        run: Online: the run that uses the artifact (lineage); default: the active `wandb.run`,
            else the public API. Offline: only its mode is read.

    Returns:
        The protected directory (`dest`).

    Raises:
        ManifestError: A file differs from W&B's record or from the manifest's sha256 (the
            message names it).
        FileNotFoundError: Offline, no artifact of that reference was logged on this machine.
        FileExistsError: `dest` exists and holds something else.
    """
    wandb = _import_wandb()
    dest = Path(dest)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # an empty directory made for the download: fill it
    active = run if run is not None else wandb.run
    if _is_offline(active):
        entry = _offline_entry(ref, project)
        return _fetch_into(dest, entry["metadata"], ref, lambda tmp: _materialize_offline(entry["entries"], tmp))
    if active is not None:
        remote = active.use_artifact(ref if "/" in ref or project is None else f"{project}/{ref}", type=ARTIFACT_TYPE)
    else:
        remote = wandb.Api().artifact(ref if "/" in ref or project is None else f"{project}/{ref}", type=ARTIFACT_TYPE)
    return _fetch_into(dest, dict(remote.metadata or {}), ref, lambda tmp: remote.download(root=str(tmp)))


def _fetch_into(dest: Path, metadata: dict[str, Any], ref: str, fill) -> Path:
    """`dest` when it already holds the verified set; else `fill(tmp)`, verify, rename to `dest`."""
    from fuse_lightning.protect import atomic_output_dir

    if dest.exists() and _same_set(dest, metadata):
        return dest
    with atomic_output_dir(dest, overwrite=False) as (final, tmp):
        fill(tmp)
        _verify_fetched(tmp, metadata, ref)
    return final


def log_export(protected_dir: str | Path, project: str | None, artifact: str | None, command: str) -> str | None:
    """For the commands' `--wandb_project`/`--wandb_artifact`: log an export, print the reference.

    Returns:
        The reference, or None when `project` is unset (nothing is logged).
    """
    if not project:
        return None
    reference = log_protected_set(protected_dir, artifact or default_artifact_name(protected_dir), project=project)
    print(f"{command}: logged to W&B project {project} as artifact {reference}")
    return reference
