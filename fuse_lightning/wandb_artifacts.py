"""Protected sets as W&B artifacts, and a reader of offline W&B run files.

`log_protected_set(dir, name)` logs an exported protected set (the directory with its
`manifest.json`) as an artifact of type `protected-dataset`, with the manifest (sha256 of every
file, PSNR/SSIM, method, config) as the artifact's metadata. `fetch_protected_set(ref, dest)`
brings the files back and checks every sha256 of the manifest (`ManifestError` naming the file
on a mismatch).

Online, both are W&B's own calls: `run.log_artifact`, then `run.use_artifact(ref).download()` (or
`wandb.Api().artifact(ref)` without a run), so the consuming run shows up in the artifact's lineage.

Offline (`WANDB_MODE=offline`) there is no server to download from, and W&B assigns no version
(`Artifact.version` raises until the run is synced). What wandb 0.31 does write locally:

* `add_dir` copies every file into W&B's staging area, `$WANDB_DATA_DIR/artifacts/staging/`
  (default `~/.local/share/wandb`), read-only, so later edits of the source cannot change the
  artifact. The copies stay there until `wandb sync` has uploaded them; after the upload W&B
  moves uploaded files to its artifact cache (`$WANDB_CACHE_DIR/artifacts/obj/md5/..`).
* The run's transaction log (`<wandb dir>/offline-run-*/run-<id>.wandb`, the file `wandb sync`
  uploads) gets an `ArtifactRecord`: name, type, digest, aliases, metadata, and W&B's manifest,
  one entry per file with its path in the artifact, its base64 md5, its size and the
  `local_path` of its staged copy.

Offline resolution uses exactly that data: `fetch_protected_set` reads the artifact record from
the run's `.wandb` file, copies each entry's staged copy (or, once synced, W&B's cached object
with that md5) into `dest`, checks W&B's md5 and size of each file, then the sha256 of every file
listed in the copied `manifest.json` (which must also equal the `files` of the artifact's
metadata). The original protected directory is never read. W&B itself keeps no name -> version
table offline, so `log_protected_set` adds one line per logged artifact to a small index,
`$WANDB_DATA_DIR/fuse-lightning/offline-artifacts.jsonl` (project, name, local version, W&B's
digest, aliases, the `.wandb` file). Local versions count distinct digests per project and name
as the server does (`v0`, `v1`, ...; the same files logged again keep their version), so
`name:v0`, `name:latest`, `name:<alias>` and `project/name:vN` all resolve offline. The
versions the server assigns on `wandb sync` follow the order of syncing and may differ.
Offline resolution works on the machine (and `$WANDB_DATA_DIR`) that logged the artifact;
another machine needs the run synced and then fetches online.

`read_offline_run(path)` decodes a `.wandb` file (config, history rows, summary, saved files,
artifacts) without a server, e.g. to check in tests what a run has logged.

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
import shutil
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fuse_lightning.manifest import MANIFEST_NAME, ManifestError, find_manifest, verify_manifest

__all__ = [
    "ARTIFACT_TYPE",
    "OfflineArtifact",
    "OfflineRun",
    "default_artifact_name",
    "fetch_protected_set",
    "find_offline_runs",
    "iter_run_records",
    "log_protected_set",
    "offline_index_path",
    "read_offline_run",
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
# Offline run files (`run-<id>.wandb`)
# --------------------------------------------------------------------------------------------

# The transaction log is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1,
# version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32 of type + data,
# little-endian length, type: 1 full, 2 first, 3 middle, 4 last). Every record is one
# serialized `wandb_internal_pb2.Record`. (wandb 0.31 ships no Python reader of its own.)
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """A `.wandb` file that cannot be read."""


def _record_payloads(run_file: Path) -> Iterator[bytes]:
    raw = run_file.read_bytes()
    if len(raw) < _FILE_HEADER.size:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(raw)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise OfflineRunError(f"{run_file} is not a W&B transaction log (header {raw[:7]!r})")
    pos, pending = _FILE_HEADER.size, None
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer: padding
            pos += left
            continue
        if pos + _CHUNK_HEADER.size > len(raw):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(raw, pos)
        if kind == 0 and length == 0:  # zero padding at the end of a file still being written
            return
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if end > len(raw):  # the writer has not finished this chunk
            return
        data = raw[start:end]
        if zlib.crc32(bytes([kind]) + data) != crc:
            raise OfflineRunError(f"{run_file}: checksum mismatch at byte {pos}")
        pos = end
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE and pending is not None:
            pending += data
        elif kind == _LAST and pending is not None:
            yield pending + data
            pending = None


def iter_run_records(run_file: str | os.PathLike):
    """Every `wandb_internal_pb2.Record` of an offline run's `.wandb` file, in order.

    Args:
        run_file: A `run-<id>.wandb` file, or the `offline-run-*` directory holding it.
    """
    from wandb.proto import wandb_internal_pb2

    for payload in _record_payloads(_run_file(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _run_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if len(found) != 1:
            raise OfflineRunError(f"{path}: expected one run-*.wandb file, found {len(found)}")
        return found[0]
    return path


def find_offline_runs(root: str | os.PathLike) -> list[Path]:
    """The `.wandb` files of every offline run under `root` (recursively), oldest first."""
    files = [p for p in Path(root).rglob("run-*.wandb") if p.parent.name.startswith("offline-run-")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, str(p)))


@dataclass
class OfflineArtifact:
    """An artifact as an offline run recorded it.

    Attributes:
        name: Artifact name (no version: offline runs have none).
        type: Artifact type, e.g. `protected-dataset`.
        digest: W&B's digest of the artifact's manifest.
        aliases: Aliases given to `log_artifact`.
        metadata: The artifact's metadata.
        entries: Path in the artifact -> {"digest" (base64 md5), "size", "local_path" (staged copy)}.
        project: Project of the run that logged it.
        run_file: The `.wandb` file holding the record.
    """

    name: str
    type: str
    digest: str
    aliases: list[str]
    metadata: dict[str, Any]
    entries: dict[str, dict[str, Any]]
    project: str
    run_file: Path


@dataclass
class OfflineRun:
    """What an offline W&B run logged, decoded from its `.wandb` file.

    Attributes:
        run_file: The `.wandb` file.
        run_id, project, name, group, job_type, tags: The run's identity.
        config: The run config, nested as logged (`config["model"]["init_args"]["eps"]`).
        history: One dict per `wandb.log` call, with `_step`; media values are their W&B
            descriptions (`{"_type": "images/separated", "filenames": [...], ...}`).
        summary: The final summary.
        files: Paths (relative to the run's `files/`) of the files the run saved.
        artifacts: The artifacts the run logged.
        exit_code: The run's exit code; None while the record of its end is not written.
    """

    run_file: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[OfflineArtifact] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def finished(self) -> bool:
        """Whether the file holds the run's end (everything it logged is then in the file)."""
        return self.exit_code is not None

    def values(self, key: str) -> list[tuple[int, Any]]:
        """`(_step, value)` of every history row that logged `key`."""
        return [(row["_step"], row[key]) for row in self.history if key in row]

    @property
    def files_dir(self) -> Path:
        """The run's `files/` directory (saved files and media)."""
        return self.run_file.parent / "files"


def _item_path(item) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _del_nested(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _apply_items(target: dict[str, Any], update, remove=()) -> None:
    for item in update:
        _set_nested(target, _item_path(item), json.loads(item.value_json))
    for item in remove:
        _del_nested(target, _item_path(item))


def _offline_artifact(record, project: str, run_file: Path) -> OfflineArtifact:
    entries = {
        entry.path: {"digest": entry.digest, "size": int(entry.size), "local_path": entry.local_path, "ref": entry.ref}
        for entry in record.manifest.contents
    }
    return OfflineArtifact(
        name=record.name, type=record.type, digest=record.digest, aliases=list(record.aliases),
        metadata=json.loads(record.metadata) if record.metadata else {}, entries=entries,
        project=record.project or project, run_file=run_file,
    )


def read_offline_run(path: str | os.PathLike, *, wait_s: float = 0.0) -> OfflineRun:
    """Decode an offline run: config, history, summary, saved files and artifacts.

    W&B's service writes the file asynchronously, also after `run.finish()` has returned: pass
    `wait_s` to wait (up to that many seconds) until the record of the run's end is in the file.

    Args:
        path: A `run-<id>.wandb` file or its `offline-run-*` directory (see `find_offline_runs`).
        wait_s: Wait up to this long for the run's end; 0 reads what is there now.

    Returns:
        The decoded run (`finished` says whether its end was recorded).

    Raises:
        OfflineRunError: Not a W&B transaction log, or a corrupt one.
    """
    deadline = time.monotonic() + wait_s
    while True:
        run = _read_offline_run(_run_file(path))
        if run.finished or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _read_offline_run(run_file: Path) -> OfflineRun:
    run = OfflineRun(run_file=run_file)
    for record in iter_run_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
            run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
            _apply_items(run.config, r.config.update, r.config.remove)
        elif kind == "config":
            _apply_items(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply_items(row, record.history.item)
            row.setdefault("_step", int(record.history.step.num))
            run.history.append(row)
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update, record.summary.remove)
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files if f.path not in run.files)
        elif kind == "artifact":
            run.artifacts.append(_offline_artifact(record.artifact, run.project, run_file))
        elif kind == "exit":
            run.exit_code = int(record.exit.exit_code)
    run.config.pop("_wandb", None)
    return run


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
    """Give an artifact logged offline a local version and record where its record lives."""
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
            "aliases": list(aliases), "run_id": run.id, "run_file": str(Path(run.settings.sync_file).resolve()),
            "logged": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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


def _offline_candidates(ref: str, project: str | None) -> list[dict[str, Any]]:
    """Index entries that `ref` names, best first."""
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
    return list(reversed(picked))  # newest first


def _find_record(entry: dict[str, Any], wait_s: float = 60.0) -> OfflineArtifact | None:
    """The artifact record an index entry points to.

    W&B writes records asynchronously: while the run has not recorded its end, wait up to
    `wait_s` for the record to appear.
    """
    run_file = Path(entry["run_file"])
    deadline = time.monotonic() + wait_s
    while run_file.is_file():
        run = _read_offline_run(run_file)
        for artifact in reversed(run.artifacts):
            if artifact.name == entry["name"] and artifact.digest == entry["digest"]:
                return artifact
        if run.finished or time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
    return None


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


def _materialize_offline(artifact: OfflineArtifact, target_dir: Path) -> None:
    for rel, entry in artifact.entries.items():
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
        artifact = None
        for entry in _offline_candidates(ref, project):
            artifact = _find_record(entry)
            if artifact is not None:
                break
        if artifact is None:
            raise FileNotFoundError(f"artifact {ref}: the offline run that logged it is gone ({entry['run_file']})")
        return _fetch_into(dest, artifact.metadata, ref, lambda tmp: _materialize_offline(artifact, tmp))
    if active is not None:
        remote = active.use_artifact(ref if "/" in ref or project is None else f"{project}/{ref}", type=ARTIFACT_TYPE)
    else:
        remote = wandb.Api().artifact(ref if "/" in ref or project is None else f"{project}/{ref}", type=ARTIFACT_TYPE)
    return _fetch_into(dest, dict(remote.metadata or {}), ref, lambda tmp: remote.download(root=str(tmp)))


def _fetch_into(dest: Path, metadata: dict[str, Any], ref: str, fill) -> Path:
    """`dest` when it already holds the verified set; else `fill(tmp)`, verify, rename to `dest`."""
    from fuse_lightning.protect import commit_output_dir, prepare_output_dir

    if dest.exists() and _same_set(dest, metadata):
        return dest
    final, tmp = prepare_output_dir(dest, overwrite=False)
    try:
        fill(tmp)
        _verify_fetched(tmp, metadata, ref)
        commit_output_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
