"""SQLite records of plugin runs, with their per-host summary and output."""

from __future__ import annotations

import json
import sqlite3

from ..models import HostResult, PluginRun

__all__ = ["RunStore"]


class RunStore:
    """Typed access to ``plugin_runs``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def save(self, run: PluginRun) -> None:
        summary = json.dumps({host: result.model_dump() for host, result in run.hosts.items()})
        self._db.execute(
            "INSERT OR REPLACE INTO plugin_runs "
            "(id, plugin, target, started_at, finished_at, ok, summary, output) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.id,
                run.plugin,
                run.target,
                run.started_at,
                run.finished_at,
                None if run.ok is None else int(run.ok),
                summary,
                run.output,
            ),
        )

    def all(self) -> list[PluginRun]:
        rows = self._db.execute(
            "SELECT id, plugin, target, started_at, finished_at, ok, summary, output "
            "FROM plugin_runs ORDER BY started_at"
        )
        runs = []
        for run_id, plugin, target, started, finished, ok, summary, output in rows:
            hosts = {h: HostResult(**r) for h, r in json.loads(summary or "{}").items()}
            runs.append(
                PluginRun(
                    id=run_id,
                    plugin=plugin,
                    target=target,
                    started_at=started,
                    finished_at=finished,
                    ok=None if ok is None else bool(ok),
                    hosts=hosts,
                    output=output or "",
                )
            )
        return runs
