"""Dask clusters in the node's SQLite database; the client's TLS files in
``<home>/clusters/<id>/`` (folder 0700, files 0600)."""

from __future__ import annotations

import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._match import unique_prefix
from ..config import atomic_write
from ..errors import ClusterNotFound, InvalidRequest, StateError
from .models import (
    FINAL_STATES,
    ClusterCreate,
    ClusterSecurity,
    ClusterState,
    ClusterView,
    WorkerView,
)

__all__ = ["ClusterStore", "check_cluster_id"]

_ID = re.compile(r"^cl[0-9a-f]{12}$")
_SEE = "p2prc cluster list"


def check_cluster_id(text: str) -> str:
    """A full cluster id, or a refusal: ids name directories, so nothing else may pass."""
    if not _ID.match(text):
        raise InvalidRequest(f"{text!r} is not a cluster id (cl + 12 hex digits)")
    return text


class ClusterStore:
    """Typed access to ``clusters`` and ``cluster_members``, and the clusters' folders."""

    def __init__(
        self, db: sqlite3.Connection, directory: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self.directory = directory
        self._clock = clock

    def __repr__(self) -> str:
        return f"<ClusterStore {self.directory}>"

    def create(self, spec: ClusterCreate) -> ClusterView:
        """Record a new cluster, ``starting``; a name a live cluster has is refused."""
        cluster_id = f"cl{secrets.token_hex(6)}"
        name = spec.name or cluster_id
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if spec.name is not None and any(
                c.name == spec.name and not c.final for c in self._all()
            ):
                raise InvalidRequest(f"a running cluster is already named {spec.name!r}")
            view = ClusterView(
                id=cluster_id, name=name, state=ClusterState.STARTING, created_at=self._clock()
            )
            self._db.execute(
                "INSERT INTO clusters (id, name, state, spec, view, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    view.id,
                    view.name,
                    view.state.value,
                    spec.model_dump_json(),
                    _cluster_json(view),
                    view.created_at,
                ),
            )
        return view

    def get(self, typed: str) -> ClusterView:
        """A cluster by id, name (the newest of that name) or unique id prefix."""
        clusters = self._all()
        named = [c for c in clusters if c.name == typed.strip()]
        if named:
            return named[-1]
        return unique_prefix(
            typed, clusters, ident=lambda c: c.id, what="cluster", missing=ClusterNotFound, see=_SEE
        )

    def spec(self, cluster_id: str) -> ClusterCreate:
        row = self._db.execute("SELECT spec FROM clusters WHERE id = ?", (cluster_id,)).fetchone()
        if row is None:
            raise ClusterNotFound(f"no cluster {cluster_id!r}; see '{_SEE}'")
        try:
            return ClusterCreate.model_validate_json(row[0])
        except ValidationError as exc:
            raise StateError(
                f"cluster {cluster_id} in the state database is damaged: {exc}"
            ) from None

    def all(self) -> list[ClusterView]:
        return self._all()

    def unfinished(self) -> list[ClusterView]:
        return [c for c in self._all() if not c.final]

    def update(self, cluster_id: str, **changes: Any) -> ClusterView:
        """Change fields of the cluster's view (not its workers); a final state is kept."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            view = self._one(cluster_id)
            if view.final and "state" in changes:
                return view
            if changes.get("state") in FINAL_STATES:
                changes.setdefault("closed_at", self._clock())
            view = view.model_copy(update=changes)
            self._db.execute(
                "UPDATE clusters SET state = ?, view = ? WHERE id = ?",
                (view.state.value, _cluster_json(view), cluster_id),
            )
        return view

    def set_worker(self, cluster_id: str, worker: WorkerView) -> None:
        """Add a worker (last in order) or replace the one of that name."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT coalesce(max(seq), 0) + 1 FROM cluster_members WHERE cluster_id = ?",
                (cluster_id,),
            ).fetchone()
            self._db.execute(
                "INSERT INTO cluster_members (cluster_id, name, seq, view) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (cluster_id, name) DO UPDATE SET view = excluded.view",
                (cluster_id, worker.name, int(row[0]), worker.model_dump_json()),
            )

    def forget_worker(self, cluster_id: str, name: str) -> None:
        self._db.execute(
            "DELETE FROM cluster_members WHERE cluster_id = ? AND name = ?", (cluster_id, name)
        )

    def cluster_dir(self, cluster_id: str) -> Path:
        return self.directory / check_cluster_id(cluster_id)

    def write_security(
        self, cluster_id: str, ca: bytes, cert: bytes, key: bytes
    ) -> ClusterSecurity:
        """The client's CA, certificate and key in the cluster's folder (0700, files 0600)."""
        folder = self.cluster_dir(cluster_id)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        files = {"ca.pem": ca, "client.pem": cert, "client-key.pem": key}
        for name, data in files.items():
            atomic_write(folder / name, data, mode=0o600)
        return ClusterSecurity(
            ca_file=str(folder / "ca.pem"),
            cert_file=str(folder / "client.pem"),
            key_file=str(folder / "client-key.pem"),
        )

    def remove_files(self, cluster_id: str) -> None:
        shutil.rmtree(self.cluster_dir(cluster_id), ignore_errors=True)

    def _one(self, cluster_id: str) -> ClusterView:
        for view in self._all(cluster_id):
            return view
        raise ClusterNotFound(f"no cluster {cluster_id!r}; see '{_SEE}'")

    def _all(self, cluster_id: str | None = None) -> list[ClusterView]:
        where, args = ("WHERE id = ?", (cluster_id,)) if cluster_id else ("", ())
        rows = self._db.execute(
            f"SELECT id, view FROM clusters {where} ORDER BY created_at", args
        ).fetchall()
        members: dict[str, list[str]] = {}
        query = "SELECT cluster_id, view FROM cluster_members ORDER BY seq"
        for owner, member in self._db.execute(query):
            members.setdefault(owner, []).append(member)
        return [_cluster(row[0], row[1], members.get(row[0], [])) for row in rows]


def _cluster_json(view: ClusterView) -> str:
    return view.model_copy(update={"workers": []}).model_dump_json()


def _cluster(cluster_id: str, view: str, workers: list[str]) -> ClusterView:
    try:
        found = ClusterView.model_validate_json(view)
        return found.model_copy(
            update={"workers": [WorkerView.model_validate_json(w) for w in workers]}
        )
    except ValidationError as exc:
        raise StateError(f"cluster {cluster_id} in the state database is damaged: {exc}") from None
