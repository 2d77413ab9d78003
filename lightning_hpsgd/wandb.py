"""Weights & Biases, the way a team uses it: offline without an API key, a wall-time axis, runs read back locally.

* [`offline_unless_logged_in`][] makes ``WandbLogger`` write offline runs when no API key is configured (the
  ``hpsgd`` command calls it), so recipes run on machines without W&B access and sync later with ``wandb sync``.
* [`define_wall_time_axis`][] charts the ``hpsgd/*`` metrics against ``time/wall_s`` by default, and leaves the
  x-axis of the user's own metrics alone (``HPSGDMonitor`` calls it for each ``WandbLogger``).
* [`read_run`][] reads an offline (or synced) run's ``.wandb`` file back, with wandb's own record reader.
* [`build_workspace`][] describes the comparison dashboard of ``docs/wandb.md`` with ``wandb-workspaces``
  (``hpsgd dashboard``).
"""

from __future__ import annotations

import json
import netrc
import os
import struct
import zlib
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning_hpsgd.extras import MissingExtraError, require

WALL_TIME = "time/wall_s"
STEP = "trainer/global_step"  # Lightning's WandbLogger adds it to every row it logs
DEFAULT_HOST = "https://api.wandb.ai"


def api_key_configured(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY``, or a netrc entry for the W&B host (``wandb login``)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def offline_unless_logged_in(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``WANDB_MODE=offline`` when no API key is configured and no mode was chosen; return whether it did.

    Offline runs are written under the logger's ``save_dir`` (``<save_dir>/wandb/offline-run-*``); ``wandb sync
    <that directory>`` uploads them later. An explicit ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) is
    always respected.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE") or api_key_configured(environ):
        return False
    environ["WANDB_MODE"] = "offline"
    return True


HPSGD_METRICS = "hpsgd/*"  # the monitor's own keys; the user's metrics are never given a new x-axis


def define_wall_time_axis(run: Any) -> None:
    """Chart the monitor's ``hpsgd/*`` metrics against ``time/wall_s`` by default; leave every other metric alone.

    Only the project's own keys are defined: ``time/wall_s`` (its summary is the maximum) and the ``hpsgd/*`` glob.
    The user's metrics keep the x-axis Lightning's ``WandbLogger`` gives them (``trainer/global_step``), so an
    existing project's charts do not change. To chart a user's metric against wall time, a panel names
    ``time/wall_s`` as its x-axis (the dashboard of [`build_workspace`][] does); ``HPSGDMonitor`` puts the wall
    time into the rows of Lightning's training and validation metrics for that ([`stage_wall_time`][]).
    """
    run.define_metric(WALL_TIME, summary="max")
    run.define_metric(HPSGD_METRICS, step_metric=WALL_TIME, step_sync=True)


def stage_wall_time(run: Any, seconds: float) -> None:
    """Put ``time/wall_s = seconds`` into the next row logged to ``run``, without a row of its own.

    W&B charts ``y`` against ``x`` from the rows that hold both. Lightning logs each batch of metrics in its own
    row, so the wall time is staged (``commit=False``) just before Lightning logs, and lands in Lightning's row.
    """
    run.log({WALL_TIME: seconds}, commit=False)


@dataclass
class WandbRun:
    """What a run's ``.wandb`` file holds, decoded: its identity, config, history rows and summary."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # define_metric records, by name or glob

    def column(self, key: str, by: str = WALL_TIME) -> list[tuple[float, float]]:
        """``(row[by], row[key])`` for every history row that has both, in logging order."""
        return [(row[by], row[key]) for row in self.history if key in row and by in row]


def find_run_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every run's ``run-*.wandb`` file under ``root`` (a save_dir, a ``wandb/`` folder or one run's folder)."""
    return sorted(Path(root).rglob("run-*.wandb"))


def read_run(path: str | os.PathLike[str]) -> WandbRun:
    """Decode one run's ``run-<id>.wandb`` transaction log (offline or synced) into a [`WandbRun`][].

    wandb 0.31 has no Python reader of its own any more (its Go service writes the file), so this reads the format
    directly: [`iter_records`][] and wandb's ``Record`` protobuf.

    Args:
        path: the ``.wandb`` file, or a folder that holds exactly one (a run's ``offline-run-*`` folder).

    Raises:
        FileNotFoundError: if there is no ``.wandb`` file at ``path``.
        ValueError: if the file is not a W&B transaction log, or a record's checksum is wrong.
        MissingExtraError: if wandb is not installed (``pip install 'lightning-hpsgd[wandb]'``).
    """
    wandb_internal_pb2 = require("wandb.proto.wandb_internal_pb2", "Reading a W&B run")

    path = Path(path)
    if path.is_dir():
        files = find_run_files(path)
        if len(files) != 1:
            found = ", ".join(str(f) for f in files) or "none"
            raise FileNotFoundError(f"Expected one run-*.wandb file under {path}; found {found}. Pass the file.")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"No W&B run file at {path}.")
    run = WandbRun(path=path)
    for data in iter_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _read_run_record(run, record.run)
        elif kind == "config":
            _apply_items(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update, record.summary.remove)
        elif kind == "metric":
            metric = record.metric
            name = metric.name or metric.glob_name
            run.metrics[name] = {"step_metric": metric.step_metric, "step_sync": metric.options.step_sync}
    return run


# The transaction log is LevelDB's log format behind a 7-byte file header: 32 KiB blocks of records, each with a
# 7-byte header (CRC-32 seeded with the record type, length, type); a record too long for a block is split.
_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # checksum, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Yield each serialized ``Record`` of a ``.wandb`` file, checksums verified; a partial tail (a run still being
    written) ends the iteration."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path} is too short to be a W&B run file.")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r}).")
    pos = _FILE_HEADER.size
    parts: list[bytes] = []
    while True:
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER.size:
            pos += _BLOCK - pos % _BLOCK  # the block's tail is padding
        if pos + _RECORD_HEADER.size > len(data):
            return
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        pos += _RECORD_HEADER.size
        if kind == 0 and length == 0:
            return  # zeros: preallocated, never written
        payload = data[pos : pos + length]
        if len(payload) < length:
            return
        pos += length
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos - length} (checksum mismatch).")
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        elif kind == _LAST:
            yield b"".join([*parts, payload])
            parts = []
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos - length}.")


def _read_run_record(run: WandbRun, record: Any) -> None:
    run.run_id = record.run_id
    run.project = record.project
    run.group = record.run_group
    run.job_type = record.job_type
    _apply_items(run.config, record.config.update, record.config.remove)
    _apply_items(run.summary, record.summary.update, [])


def _items(items: Sequence[Any]) -> dict[str, Any]:
    """History/summary items: a ``nested_key`` path or a ``key``, each with a JSON value."""
    out: dict[str, Any] = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


def _apply_items(target: dict[str, Any], update: Sequence[Any], remove: Sequence[Any]) -> None:
    target.update(_items(update))
    for item in remove:
        target.pop("/".join(item.nested_key) if item.nested_key else item.key, None)


# The comparison dashboard of docs/wandb.md: (title, x-axis, y metrics) per panel, by section.
DASHBOARD: dict[str, list[tuple[str, str, list[str]]]] = {
    "Accuracy at a fixed wall time": [
        ("Validation accuracy vs wall time (s)", WALL_TIME, ["val/acc"]),
        ("Validation accuracy vs step", STEP, ["val/acc"]),
        ("Training loss vs wall time (s)", WALL_TIME, ["train/loss"]),
        ("Throughput (samples/s, all ranks)", WALL_TIME, ["hpsgd/samples_per_s"]),
    ],
    "Is communication hidden?": [
        ("Hidden fraction of communication (1 - wait/comm)", WALL_TIME, ["hpsgd/hidden"]),
        ("Wait vs comm per round (ms)", WALL_TIME, ["hpsgd/comm_ms", "hpsgd/wait_ms"]),
        ("Step time (ms)", WALL_TIME, ["hpsgd/step_ms"]),
    ],
    "Do stale updates hurt?": [
        ("Replica drift |R - G| / |G|", STEP, ["hpsgd/drift"]),
        ("Staleness (steps from launch to merge)", STEP, ["hpsgd/staleness"]),
        ("sync_every (H of the current round)", STEP, ["hpsgd/sync_every"]),
        ("sync_delay (steps from launch to merge, tau)", STEP, ["hpsgd/sync_delay"]),
    ],
}


def build_workspace(entity: str, project: str, group: str | None = None, name: str = "HPSGD vs baselines") -> Any:
    """The comparison dashboard as a ``wandb_workspaces`` ``Workspace``: runs grouped by ``job_type`` (the strategy).

    ``workspace.save()`` creates it on the server (``hpsgd dashboard`` does). Needs ``pip install
    'lightning-hpsgd[wandb]'``.

    Args:
        entity: the W&B user or team that owns ``project``.
        project: the project the recipes log to (``lightning-hpsgd`` by default).
        group: only runs of this group (a recipe, e.g. ``mnist1d``); ``None`` shows every run of the project.
        name: the workspace's name in the W&B app.
    """
    wr = require("wandb_workspaces.reports.v2", "hpsgd dashboard")
    ws = require("wandb_workspaces.workspaces", "hpsgd dashboard")
    expr = require("wandb_workspaces.expr", "hpsgd dashboard")

    sections = [
        ws.Section(
            name=section,
            is_open=True,
            panels=[wr.LinePlot(title=title, x=x, y=list(y)) for title, x, y in panels],
        )
        for section, panels in DASHBOARD.items()
    ]
    runset = ws.RunsetSettings(
        groupby=[expr.Metric("JobType")],
        filters=[expr.Metric("Group") == group] if group else [],
    )
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runset)


def dashboard_main(args: Sequence[str] | None = None) -> None:
    """``hpsgd dashboard``: create the comparison workspace of ``docs/wandb.md`` in a W&B project."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="hpsgd dashboard",
        description="Create a W&B workspace comparing HPSGD with its baselines: accuracy against wall time, the"
        " hidden fraction of communication, wait against comm, drift. Needs an API key (wandb login) and"
        " pip install 'lightning-hpsgd[wandb]'.",
    )
    parser.add_argument("--entity", required=True, help="the W&B user or team that owns the project")
    parser.add_argument("--project", default="lightning-hpsgd", help="the project (default: %(default)s)")
    parser.add_argument("--group", help="only runs of this group, a recipe such as mnist1d (default: all runs)")
    parser.add_argument("--name", default="HPSGD vs baselines", help="the workspace's name (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list the panels and save nothing")
    options = parser.parse_args(args)
    try:
        workspace = build_workspace(options.entity, options.project, options.group, options.name)
    except MissingExtraError as err:
        raise SystemExit(f"hpsgd dashboard: error: {err}") from None
    for section in workspace.sections:
        print(section.name)
        for panel in section.panels:
            print(f"  {panel.title}: {', '.join(panel.y)} against {panel.x}")
    if options.dry_run:
        return
    workspace.save()
    print(f"Saved: {workspace.url}")
