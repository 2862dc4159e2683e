"""The durable state of files and batch jobs: SQLite (WAL) plus the file bytes on disk under one directory.

Layout: <root>/batches.sqlite3 and <root>/files/<file id>. Invariants:
- a file row exists only once its bytes are in place (written to <root>/tmp, fsynced, renamed, then inserted);
- a line result is one row keyed by (batch id, custom_id), inserted once (INSERT OR IGNORE): a line rerun
  after a crash can never add a second result, and the output file is written from these rows in input
  order, so no custom_id appears twice or goes missing;
- request_counts are counted from the rows, never kept as counters that a crash could skew.
Methods are synchronous and serialised by one lock over one connection; async callers run them in a thread.
Commits use synchronous=NORMAL: in WAL mode a committed row survives a process crash (SIGKILL); a power loss
may lose the last few, which are then rerun, not duplicated.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL,
    output_file_id TEXT, error_file_id TEXT, errors TEXT, metadata TEXT, total INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, expires_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, custom_id TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL,
    output TEXT NOT NULL, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, custom_id));
"""
_TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
               "expired_at", "cancelling_at", "cancelled_at")
_BATCH_FIELDS = ("status", "output_file_id", "error_file_id", "errors", "total", *_TIMESTAMPS)
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class BatchDirBusy(RuntimeError):
    """Another live process owns this batch directory: two job loops would run the same batches twice."""


def _lock_dir(path: Path) -> Any:
    f = open(path, "a+")  # noqa: SIM115 - held open for the store's life: the lock lives as long as the fd
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BatchDirBusy(f"batch directory {path.parent} is in use by another tokenmill process; give each "
                           "server its own --batch-dir") from None
    return f


def file_json(row: sqlite3.Row) -> dict[str, Any]:
    """OpenAI's File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "status_details": None, "expires_at": None}


class BatchStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        for d in (self.files_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._dir_lock = _lock_dir(self.root / "lock")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "batches.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._drop_orphans()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._dir_lock.close()  # releases the flock

    def _drop_orphans(self) -> None:
        """Bytes a crash left without a row (an upload or a finalize cut short) are unreachable: delete."""
        known = {r["id"] for r in self._db.execute("SELECT id FROM files")}
        for p in [*self.files_dir.iterdir(), *self.tmp_dir.iterdir()]:
            if p.parent == self.tmp_dir or p.name not in known:
                p.unlink(missing_ok=True)

    # ---- files -------------------------------------------------------------------------------
    def tmp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def add_file(self, tmp: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Move fully written bytes at `tmp` into place and record them; returns the File object."""
        fid = new_id("file-")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, self.files_dir / fid)
        with self._lock:
            self._db.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                             (fid, size, int(time.time()), filename, purpose))
            return file_json(self._row("files", fid))

    def get_file(self, fid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._row("files", fid)
        return file_json(row) if row is not None else None

    def file_path(self, fid: str) -> Path:
        return self.files_dir / fid

    def list_files(self, purpose: str | None, after: str | None, limit: int, order: str) -> tuple[list[dict], bool]:
        where, args = ("WHERE purpose = ?", [purpose]) if purpose else ("", [])
        rows, more = self._page("files", where, args, after, limit, order)
        return [file_json(r) for r in rows], more

    def delete_file(self, fid: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM files WHERE id = ?", (fid,)).rowcount > 0
        self.file_path(fid).unlink(missing_ok=True)
        return deleted

    # ---- batches -----------------------------------------------------------------------------
    def create_batch(self, endpoint: str, input_file_id: str, completion_window_s: int, window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        bid, now = new_id("batch_"), int(time.time())
        with self._lock:
            self._db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, 'validating', ?, ?, ?)",
                (bid, endpoint, input_file_id, window, json.dumps(metadata) if metadata is not None else None,
                 now, now + completion_window_s))
        return self.get_batch(bid)

    def get_batch(self, bid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._row("batches", bid)
            return self._batch_json(row) if row is not None else None

    def list_batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        rows, more = self._page("batches", "", [], after, limit, "desc")
        with self._lock:
            return [self._batch_json(r) for r in rows], more

    def active_batch_ids(self) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq",
                                    ACTIVE_STATUSES).fetchall()
        return [r["id"] for r in rows]

    def active_batches_using(self, fid: str) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({marks})",
                                    (fid, *ACTIVE_STATUSES)).fetchall()
        return [r["id"] for r in rows]

    def update_batch(self, bid: str, *, only_from: tuple[str, ...] = (), **fields: Any) -> bool:
        """Set fields (status, timestamps, errors ...); with `only_from`, only if the status is one of those.
        Returns whether the row changed: a guarded transition lost to a concurrent one (e.g. cancel) is False."""
        assert fields and set(fields) <= set(_BATCH_FIELDS), fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        args = [json.dumps(v) if k == "errors" and v is not None else v for k, v in fields.items()]
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        args.append(bid)
        if only_from:
            sql += f" AND status IN ({', '.join('?' * len(only_from))})"
            args += only_from
        with self._lock:
            return self._db.execute(sql, args).rowcount > 0

    # ---- line results ------------------------------------------------------------------------
    def record_result(self, bid: str, custom_id: str, line: int, ok: bool, output: dict[str, Any]) -> bool:
        """Commit one finished line; False (and nothing written) if that custom_id already has a result."""
        usage = ((output.get("response") or {}).get("body") or {}).get("usage") or {}
        tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO results (batch_id, custom_id, line, ok, output, "
                                   "prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (bid, custom_id, line, int(ok), json.dumps(output, ensure_ascii=False), *tokens))
            return cur.rowcount > 0

    def done_custom_ids(self, bid: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT custom_id FROM results WHERE batch_id = ?", (bid,))}

    def iter_results(self, bid: str, ok: bool) -> Iterator[str]:
        """The output lines (JSON text) of successful or failed lines, in input order."""
        with self._lock:
            rows = self._db.execute("SELECT output FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
                                    (bid, int(ok))).fetchall()
        for r in rows:
            yield r[0]

    def finish(self, bid: str, status: str, output: list[str], errors: list[str], **fields: Any) -> None:
        """Write the output and error files (when non-empty) and set the final status in one transaction."""
        now = int(time.time())
        made: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        staged = []
        for key, lines, name in (("output_file_id", output, "output"), ("error_file_id", errors, "errors")):
            if not lines:
                continue
            fid = new_id("file-")
            path = self.tmp_path()
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path, self.files_dir / fid)
            staged.append((fid, (self.files_dir / fid).stat().st_size, now, f"{bid}_{name}.jsonl", "batch_output"))
            made[key] = fid
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                                 staged)
            sets = {"status": status, f"{status}_at": now, **made, **fields}
            self._db.execute(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                             [*sets.values(), bid])
            self._db.execute("COMMIT")

    # ---- helpers -----------------------------------------------------------------------------
    def _row(self, table: str, rid: str) -> sqlite3.Row | None:
        return self._db.execute(f"SELECT * FROM {table} WHERE id = ?", (rid,)).fetchone()

    def _page(self, table: str, where: str, args: list[Any], after: str | None, limit: int,
              order: str) -> tuple[list[sqlite3.Row], bool]:
        """One cursor page (OpenAI's `after` is the last id of the previous page), and whether more follow."""
        desc = order == "desc"
        with self._lock:
            if after is not None:
                cursor = self._db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
                if cursor is not None:
                    op = "<" if desc else ">"
                    where = f"{where} {'AND' if where else 'WHERE'} seq {op} ?"
                    args = [*args, cursor[0]]
            rows = self._db.execute(f"SELECT * FROM {table} {where} ORDER BY seq {'DESC' if desc else 'ASC'} "
                                    "LIMIT ?", [*args, limit + 1]).fetchall()
        return rows[:limit], len(rows) > limit

    def _batch_json(self, row: sqlite3.Row) -> dict[str, Any]:
        """OpenAI's Batch object; request_counts counted from the result rows (caller holds the lock)."""
        done, ok, num_in, num_out = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(ok), 0), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0) FROM results WHERE batch_id = ?", (row["id"],)).fetchone()
        body = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
                "errors": json.loads(row["errors"]) if row["errors"] else None,
                "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
                "status": row["status"], "output_file_id": row["output_file_id"],
                "error_file_id": row["error_file_id"]}
        body.update({k: row[k] for k in _TIMESTAMPS})
        body["request_counts"] = {"total": row["total"], "completed": ok, "failed": done - ok}
        body["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
        # OpenAI's usage of a batch: tokens of the finished lines (what `tokenmill cost` turns into a rate)
        body["usage"] = {"input_tokens": num_in, "output_tokens": num_out, "total_tokens": num_in + num_out,
                         "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens_details": {"reasoning_tokens": 0}}
        return body
