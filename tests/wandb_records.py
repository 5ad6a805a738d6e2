"""A reader of offline W&B run files (`run-<id>.wandb`), for tests: what did a run log?

wandb 0.31 ships no Python reader of its own transaction log, so the tests decode it here:
config, history rows, summary, saved files and artifact records.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
