"""The results database: one SQLite row per measured point, with its full protocol.

A point is identified by the model's weight hash, the machine, the recipe (calibration included)
and the evaluation protocol, so results from several models or machines live side by side and a
rerun finds exactly the points it already has. A point is marked 'running' before its work starts
and 'done' in the same transaction that stores its result: a point killed half way stays
'running' and is redone; a finished one is never lost (SQLite commits are atomic).

Several sweeps can share one database and split a grid: a point is *claimed* (owner = host and
process id, plus a heartbeat refreshed while it is measured) in one immediate transaction before
its work starts, so no two processes measure the same point. A claim is taken over when its owner
is gone: on the same host when its process no longer exists, on another host when its heartbeat
is older than `STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from compresslm.fileio import process_alive

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    model_sha TEXT NOT NULL,
    machine TEXT NOT NULL,
    point_key TEXT NOT NULL,
    protocol_key TEXT NOT NULL,
    grid TEXT NOT NULL,
    label TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    result TEXT,
    owner TEXT,
    heartbeat REAL,
    PRIMARY KEY (model_sha, machine, point_key, protocol_key)
)
"""
HEARTBEAT_S = 10.0  # how often a claimed point's owner says it is alive
STALE_AFTER_S = 120.0  # a claim from another host without a heartbeat this long is taken over


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine_id() -> str:
    """Where the numbers were measured: architecture, cores, CPU model and OS (not the host name).

    The kernel release is left out: it changes with every VM image or update, and a rerun on the same
    hardware must find its finished points. Each result keeps the full platform string
    (`eval_protocol.versions.platform`), so nothing is lost.
    """
    return f"{platform.machine()} {os.cpu_count()} cpus, {_cpu_model()}, {platform.system()}"


# Before 2026-11-24 the id was "x86_64 2 cpus, Linux 6.18.44-fc-v595": architecture, cores, OS, release.
_LEGACY_MACHINE = re.compile(r"^(\S+) (\d+) cpus, (\w+) \S+$")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def owner_id() -> str:
    """This process, as a claim names it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    """Whether the process that claimed a point may still be measuring it."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return process_alive(int(pid))
    return heartbeat is not None and time.time() - heartbeat < STALE_AFTER_S


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        with self.db:
            self.db.execute(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(points)")}
            for column, kind in (("owner", "TEXT"), ("heartbeat", "REAL")):  # databases of compresslm 0.1
                if column not in columns:
                    self.db.execute(f"ALTER TABLE points ADD COLUMN {column} {kind}")
        self._adopt_legacy_rows()

    def upgrade_keys(self, upgrade: Callable[[str], str | None]) -> int:
        """Re-key rows whose point key `upgrade` maps to a new one (keys of an older compresslm); returns
        how many. A row whose new key is taken already stays as it was."""
        changed = 0
        with self.db:
            for (old,) in self.db.execute("SELECT DISTINCT point_key FROM points").fetchall():
                new = upgrade(old)
                if new is not None and new != old:
                    changed += self.db.execute("UPDATE OR IGNORE points SET point_key=? WHERE point_key=?",
                                               (new, old)).rowcount  # fmt: skip
        return changed

    def adopt_model(self, old_sha: str, model_sha: str) -> None:
        """Give rows keyed by a model's old hash (weights only, before compresslm 0.2) its current one."""
        if old_sha != model_sha:
            with self.db:
                self.db.execute("UPDATE OR IGNORE points SET model_sha=? WHERE model_sha=?", (model_sha, old_sha))

    def claim(self, model_sha: str, machine: str, point_key: str, protocol_key: str, grid: str, label: str,
              since: str) -> str:  # fmt: skip
        """Claim a point for this process: 'claimed', 'done' (finished, or failed since `since`) or 'busy'.

        'busy' means another live process holds it. The check and the claim are one immediate
        transaction, so two processes never both get 'claimed'.
        """
        key = (model_sha, machine, point_key, protocol_key)
        me = owner_id()
        self.db.isolation_level = None
        try:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute(
                "SELECT status, owner, heartbeat, finished_at FROM points "
                "WHERE model_sha=? AND machine=? AND point_key=? AND protocol_key=?", key
            ).fetchone()  # fmt: skip
            if row is not None:
                status, owner, heartbeat, finished = row
                if status == "done" or (status == "failed" and (finished or "") >= since):
                    self.db.execute("COMMIT")
                    return "done"
                if status == "running" and owner != me and _owner_alive(owner, heartbeat):
                    self.db.execute("COMMIT")
                    return "busy"
            self.db.execute(
                "INSERT INTO points (model_sha, machine, point_key, protocol_key, grid, label, status, started_at, "
                "owner, heartbeat) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?) "
                "ON CONFLICT (model_sha, machine, point_key, protocol_key) DO UPDATE SET status='running', "
                "started_at=excluded.started_at, label=excluded.label, grid=excluded.grid, result=NULL, "
                "finished_at=NULL, owner=excluded.owner, heartbeat=excluded.heartbeat",
                (*key, grid, label, utc_now(), me, time.time()),
            )
            self.db.execute("COMMIT")
            return "claimed"
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        finally:
            self.db.isolation_level = ""

    def release(self, model_sha: str, machine: str, point_key: str, protocol_key: str) -> None:
        """Give up a claim without a result (an interrupted point): anyone may take it now."""
        with self.db:
            self.db.execute(
                "UPDATE points SET owner=NULL WHERE model_sha=? AND machine=? AND point_key=? AND protocol_key=? "
                "AND owner=? AND status='running'", (model_sha, machine, point_key, protocol_key, owner_id())
            )  # fmt: skip

    @contextlib.contextmanager
    def heartbeat(self, model_sha: str, machine: str, point_key: str, protocol_key: str) -> Iterator[None]:
        """Refresh this process's claim every HEARTBEAT_S seconds while the block runs."""
        stop = threading.Event()
        key = (model_sha, machine, point_key, protocol_key, owner_id())

        def beat() -> None:
            db = sqlite3.connect(self.path, timeout=60)
            try:
                while not stop.wait(HEARTBEAT_S):
                    with db:
                        db.execute("UPDATE points SET heartbeat=? WHERE model_sha=? AND machine=? AND point_key=? "
                                   "AND protocol_key=? AND owner=?", (time.time(), *key))  # fmt: skip
            finally:
                db.close()

        thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _adopt_legacy_rows(self) -> None:
        """Give rows with an old-style machine id (kernel release included) this machine's id when
        architecture, core count and OS agree: the id they would have had had the release never been
        part of it (the old id never named the CPU model). A row that would collide is left as it is."""
        here = (platform.machine(), str(os.cpu_count()), platform.system())
        with self.db:
            for (machine,) in self.db.execute("SELECT DISTINCT machine FROM points").fetchall():
                legacy = _LEGACY_MACHINE.match(machine)
                if legacy and legacy.groups() == here:
                    self.db.execute("UPDATE OR IGNORE points SET machine=? WHERE machine=?", (machine_id(), machine))

    def close(self) -> None:
        self.db.close()

    def is_done(self, model_sha: str, machine: str, point_key: str, protocol_key: str) -> bool:
        row = self.db.execute(
            "SELECT status FROM points WHERE model_sha=? AND machine=? AND point_key=? AND protocol_key=?",
            (model_sha, machine, point_key, protocol_key),
        ).fetchone()
        return row is not None and row[0] == "done"

    def finish(self, model_sha: str, machine: str, point_key: str, protocol_key: str, result: dict) -> None:
        self._end("done", result, model_sha, machine, point_key, protocol_key)

    def fail(self, model_sha: str, machine: str, point_key: str, protocol_key: str, error: str) -> None:
        """Record why a point could not be measured (an impossible budget, say); a rerun tries it again."""
        self._end("failed", {"error": error}, model_sha, machine, point_key, protocol_key)

    def _end(self, status: str, result: dict, *key: str) -> None:
        with self.db:
            self.db.execute(
                "UPDATE points SET status=?, finished_at=?, result=?, owner=NULL "
                "WHERE model_sha=? AND machine=? AND point_key=? AND protocol_key=?",
                (status, utc_now(), json.dumps(result), *key),
            )

    def failures(self, grid: str | None = None) -> list[dict]:
        """Points whose last attempt failed, each with its label, model, machine and error."""
        query = "SELECT label, model_sha, machine, grid, result FROM points WHERE status='failed'"
        rows = self.db.execute(query + (" AND grid=?" if grid else ""), (grid,) if grid else ())
        return [{"label": label, "model_sha": sha, "machine": machine, "grid": g, **json.loads(result)}
                for label, sha, machine, g, result in rows]  # fmt: skip

    def results(self, grid: str | None = None, latest: bool = False) -> list[dict]:
        """Finished points (optionally of one grid), each with its model, machine and grid.

        `latest`: of points sharing a grid, label, model, machine and protocol (a point re-measured
        after its recipe changed, e.g. a new dial artifact), only the last finished; each kept row
        then counts the rows it supersedes in `superseded`.
        """
        query = (
            "SELECT model_sha, machine, grid, label, point_key, protocol_key, result FROM points WHERE status='done'"
        )
        args: tuple = ()
        if grid is not None:
            query += " AND grid=?"
            args = (grid,)
        rows = []
        for model_sha, machine, grid_name, label, point_key, protocol_key, result in self.db.execute(
            query + (" ORDER BY finished_at, rowid" if latest else " ORDER BY rowid"), args
        ):
            rows.append({**json.loads(result), "model_sha": model_sha, "machine": machine, "grid": grid_name,
                         "label": label, "point_key": point_key, "protocol_key": protocol_key})  # fmt: skip
        if not latest:
            return rows
        newest: dict[tuple, dict] = {}
        for row in rows:
            same = (row["model_sha"], row["machine"], row["grid"], row["label"], row["protocol_key"])
            row["superseded"] = newest[same]["superseded"] + 1 if same in newest else 0
            newest.pop(same, None)  # re-inserted: the order of first measurement is lost, the latest's kept
            newest[same] = row
        return list(newest.values())

    def unfinished(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT label FROM points WHERE status!='done'")]
