"""The vector stores behind OpenAI's Files and Vector Stores APIs, on disk under one directory:

    <data_dir>/meta.sqlite           files, vector stores, store files, batches, chunks (+ vectors)
    <data_dir>/files/<file id>       uploaded bytes
    <data_dir>/indexes/<vs id>/v<N>.faiss   the store's FAISS index at version N of its chunks

SQLite is the source of truth; every change is one transaction (WAL journal), so a process that
dies leaves either the old or the new state. A FAISS index is derived data: it is updated in
memory as files complete, written atomically by `flush`, and rebuilt from the chunks' vectors in
SQLite when its file is missing or older than the store's version. Several processes may open the
same directory (read replicas): each checks the store's version on every search and reloads.

Methods return OpenAI's JSON objects as dicts (the HTTP layer validates nothing twice). Bad
input raises ValueError naming the field; an unknown id raises NotFoundError.
"""
import json
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from rag.attributes import matches, validate_attributes, validate_filter
from rag.chunking import ChunkingStrategy, chunk_text, chunking_strategy
from rag.index import KINDS, VectorIndex
from rag.parsing import extract_text

FILE_PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
                 "vision", "user_data", "evals")
FILE_STATUSES = ("in_progress", "completed", "cancelled", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vector_stores (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL, metadata TEXT NOT NULL, expires_after TEXT, index_kind TEXT NOT NULL,
    created_at INTEGER NOT NULL, last_active_at INTEGER NOT NULL, dim INTEGER, version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS store_files (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vector_store_id TEXT NOT NULL, file_id TEXT NOT NULL, batch_id TEXT, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, error_code TEXT, error_message TEXT, attributes TEXT NOT NULL,
    chunking TEXT NOT NULL, usage_bytes INTEGER NOT NULL DEFAULT 0, UNIQUE (vector_store_id, file_id));
CREATE INDEX IF NOT EXISTS store_files_status ON store_files (status);
CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    vector_store_id TEXT NOT NULL, created_at INTEGER NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, vector_store_id TEXT NOT NULL,
    file_id TEXT NOT NULL, position INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks (vector_store_id, file_id);
"""


class NotFoundError(LookupError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def page(items: list[dict], limit: int, order: str, after: str | None, before: str | None) -> dict:
    """OpenAI's cursor page over items listed oldest first: `after`/`before` are object ids."""
    if not isinstance(limit, int) or not 1 <= limit <= 100:
        raise ValueError(f"limit: must be an integer in [1, 100], got {limit!r}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order: must be 'asc' or 'desc', got {order!r}")
    if order == "desc":
        items = items[::-1]
    ids = [item["id"] for item in items]
    start, end = 0, len(items)
    if after is not None:
        if after not in ids:
            raise NotFoundError(f"after: no object with id {after!r} in this list", "after")
        start = ids.index(after) + 1
    if before is not None:
        if before not in ids:
            raise NotFoundError(f"before: no object with id {before!r} in this list", "before")
        end = ids.index(before)
        start = max(start, end - limit) if after is None else start
    data = items[start:min(end, start + limit)]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + len(data) < end}


class VectorStores:
    """tokenizer: the embedding model's (chunks are counted in its tokens); max_chunk_tokens: the
    most text tokens one embedding input may hold (rag.chunking.max_chunk_tokens)."""

    def __init__(self, data_dir: str, tokenizer, max_chunk_tokens: int):
        self.data_dir, self.tokenizer, self.max_chunk_tokens = data_dir, tokenizer, max_chunk_tokens
        os.makedirs(os.path.join(data_dir, "files"), exist_ok=True)
        os.makedirs(os.path.join(data_dir, "indexes"), exist_ok=True)
        self.db = sqlite3.connect(os.path.join(data_dir, "meta.sqlite"), isolation_level=None,
                                  check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()  # one connection, shared by the event loop and worker threads
        self.store_locks: dict[str, threading.Lock] = {}  # index updates of one store, in order
        self.indexes: dict[str, tuple[int, VectorIndex]] = {}  # vs id -> (version, index) in memory
        self.dirty: set[str] = set()  # stores whose in-memory index is newer than its file

    # ---- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE also serializes writers in other processes."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def store_lock(self, vs_id: str) -> threading.Lock:
        with self.lock:
            return self.store_locks.setdefault(vs_id, threading.Lock())

    def close(self) -> None:
        self.flush()
        with self.lock:
            self.db.close()

    # ---- files ----------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> str:
        return os.path.join(self.data_dir, "files", file_id)

    def create_file(self, filename: str, purpose: str, data: bytes) -> dict:
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"purpose: must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}")
        if not filename:
            raise ValueError("file: the upload needs a filename")
        file_id = new_id("file-")
        write_atomically(self.file_path(file_id), data)  # bytes first: a row never points at nothing
        with self.tx() as db:
            db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (file_id, os.path.basename(filename), purpose, len(data), now()))
        return self.get_file(file_id)

    def _file_row(self, file_id: str, param: str = "file_id") -> sqlite3.Row:
        rows = self.query("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise NotFoundError(f"No file found with id {file_id!r}", param)
        return rows[0]

    def get_file(self, file_id: str) -> dict:
        return file_object(self._file_row(file_id))

    def list_files(self, purpose: str | None = None, limit: int = 100, order: str = "desc",
                   after: str | None = None) -> dict:
        rows = self.query("SELECT * FROM files ORDER BY seq") if purpose is None else \
            self.query("SELECT * FROM files WHERE purpose = ? ORDER BY seq", (purpose,))
        if not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise ValueError(f"limit: must be an integer in [1, 10000], got {limit!r}")
        items = [file_object(r) for r in rows]
        return page(items, min(limit, 100), order, after, None) if limit <= 100 else \
            page_large(items, limit, order, after)

    def file_content(self, file_id: str) -> tuple[str, bytes]:
        row = self._file_row(file_id)
        with open(self.file_path(file_id), "rb") as f:
            return row["filename"], f.read()

    def delete_file(self, file_id: str) -> dict:
        """Deletes the file and takes it out of every vector store it was attached to."""
        self._file_row(file_id)
        stores = [r["vector_store_id"] for r in
                  self.query("SELECT vector_store_id FROM store_files WHERE file_id = ?", (file_id,))]
        for vs_id in stores:
            self.detach_file(vs_id, file_id)
        with self.tx() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        try:
            os.unlink(self.file_path(file_id))
        except FileNotFoundError:
            pass
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- vector stores --------------------------------------------------------------------------
    def create_store(self, name: str | None = None, metadata: dict | None = None,
                     expires_after: dict | None = None, index_kind: str = "flat", file_ids: list[str] = (),
                     chunking: Any = None) -> dict:
        metadata = validate_metadata(metadata)
        expires_after = validate_expires_after(expires_after)
        if index_kind not in KINDS:
            raise ValueError(f"index: must be one of {', '.join(KINDS)}, got {index_kind!r}")
        strategy = chunking_strategy(chunking, self.max_chunk_tokens)
        for i, file_id in enumerate(file_ids):
            self._file_row(file_id, f"file_ids[{i}]")
        vs_id, t = new_id("vs_"), now()
        with self.tx() as db:
            db.execute("INSERT INTO vector_stores (id, name, metadata, expires_after, index_kind, created_at, "
                       "last_active_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (vs_id, name or "", json.dumps(metadata), json.dumps(expires_after) if expires_after else None,
                        index_kind, t, t))
            for file_id in dict.fromkeys(file_ids):
                self._insert_store_file(db, vs_id, file_id, {}, strategy, None)
        return self.get_store(vs_id)

    def _store_row(self, vs_id: str, param: str = "vector_store_id") -> sqlite3.Row:
        rows = self.query("SELECT * FROM vector_stores WHERE id = ?", (vs_id,))
        if not rows:
            raise NotFoundError(f"No vector store found with id {vs_id!r}", param)
        return rows[0]

    def get_store(self, vs_id: str) -> dict:
        return self._store_object(self._store_row(vs_id))

    def _store_object(self, row: sqlite3.Row) -> dict:
        counts = {s: 0 for s in FILE_STATUSES}
        usage = 0
        for r in self.query("SELECT status, COUNT(*) AS n, SUM(usage_bytes) AS usage FROM store_files "
                            "WHERE vector_store_id = ? GROUP BY status", (row["id"],)):
            counts[r["status"]] = r["n"]
            usage += r["usage"] or 0
        expires_after = json.loads(row["expires_after"]) if row["expires_after"] else None
        expires_at = row["last_active_at"] + 86400 * expires_after["days"] if expires_after else None
        status = "expired" if expires_at is not None and expires_at < now() else \
            "in_progress" if counts["in_progress"] else "completed"
        return {"id": row["id"], "object": "vector_store", "created_at": row["created_at"], "name": row["name"],
                "usage_bytes": usage, "file_counts": {**counts, "total": sum(counts.values())}, "status": status,
                "expires_after": expires_after, "expires_at": expires_at, "last_active_at": row["last_active_at"],
                "metadata": json.loads(row["metadata"])}

    def list_stores(self, limit: int = 20, order: str = "desc", after: str | None = None,
                    before: str | None = None) -> dict:
        rows = self.query("SELECT * FROM vector_stores ORDER BY seq")
        return page([self._store_object(r) for r in rows], limit, order, after, before)

    def update_store(self, vs_id: str, name: str | None = None, metadata: dict | None = None,
                     expires_after: dict | None = None) -> dict:
        self._store_row(vs_id)
        with self.tx() as db:
            if name is not None:
                db.execute("UPDATE vector_stores SET name = ? WHERE id = ?", (name, vs_id))
            if metadata is not None:
                db.execute("UPDATE vector_stores SET metadata = ? WHERE id = ?",
                           (json.dumps(validate_metadata(metadata)), vs_id))
            if expires_after is not None:
                db.execute("UPDATE vector_stores SET expires_after = ? WHERE id = ?",
                           (json.dumps(validate_expires_after(expires_after)), vs_id))
        return self.get_store(vs_id)

    def delete_store(self, vs_id: str) -> dict:
        self._store_row(vs_id)
        with self.store_lock(vs_id), self.tx() as db:
            for table in ("chunks", "store_files", "batches"):
                db.execute(f"DELETE FROM {table} WHERE vector_store_id = ?", (vs_id,))
            db.execute("DELETE FROM vector_stores WHERE id = ?", (vs_id,))
            self.indexes.pop(vs_id, None)
            self.dirty.discard(vs_id)
        remove_tree(os.path.join(self.data_dir, "indexes", vs_id))
        return {"id": vs_id, "object": "vector_store.deleted", "deleted": True}

    # ---- files in a store -----------------------------------------------------------------------
    def attach_file(self, vs_id: str, file_id: str, attributes: Any = None, chunking: Any = None) -> dict:
        """Attach a file for ingestion (status in_progress); attaching it again re-ingests it."""
        self._store_row(vs_id)
        self._file_row(file_id)
        attributes = validate_attributes(attributes)
        strategy = chunking_strategy(chunking, self.max_chunk_tokens)
        with self.store_lock(vs_id), self.tx() as db:
            self._remove_store_file(db, vs_id, file_id)
            self._insert_store_file(db, vs_id, file_id, attributes, strategy, None)
        return self.get_store_file(vs_id, file_id)

    def _insert_store_file(self, db, vs_id: str, file_id: str, attributes: dict, strategy: ChunkingStrategy,
                           batch_id: str | None) -> None:
        db.execute("INSERT INTO store_files (vector_store_id, file_id, batch_id, created_at, status, attributes, "
                   "chunking) VALUES (?, ?, ?, ?, 'in_progress', ?, ?)",
                   (vs_id, file_id, batch_id, now(), json.dumps(attributes), json.dumps(strategy.as_dict())))

    def _remove_store_file(self, db, vs_id: str, file_id: str) -> bool:
        """Delete the attachment and its chunks; bumps the store's version if chunks went away."""
        removed = db.execute("DELETE FROM chunks WHERE vector_store_id = ? AND file_id = ?", (vs_id, file_id)).rowcount
        attached = db.execute("DELETE FROM store_files WHERE vector_store_id = ? AND file_id = ?",
                              (vs_id, file_id)).rowcount
        if removed:
            db.execute("UPDATE vector_stores SET version = version + 1 WHERE id = ?", (vs_id,))
            self.indexes.pop(vs_id, None)  # rebuilt from SQLite at the next search
            self.dirty.discard(vs_id)
        return bool(attached)

    def _store_file_row(self, vs_id: str, file_id: str) -> sqlite3.Row:
        self._store_row(vs_id)
        rows = self.query("SELECT * FROM store_files WHERE vector_store_id = ? AND file_id = ?", (vs_id, file_id))
        if not rows:
            raise NotFoundError(f"No file {file_id!r} in vector store {vs_id!r}", "file_id")
        return rows[0]

    def get_store_file(self, vs_id: str, file_id: str) -> dict:
        return store_file_object(self._store_file_row(vs_id, file_id))

    def list_store_files(self, vs_id: str, status: str | None = None, limit: int = 20, order: str = "desc",
                         after: str | None = None, before: str | None = None, batch_id: str | None = None) -> dict:
        self._store_row(vs_id)
        if status is not None and status not in FILE_STATUSES:
            raise ValueError(f"filter: must be one of {', '.join(FILE_STATUSES)}, got {status!r}")
        sql, args = "SELECT * FROM store_files WHERE vector_store_id = ?", [vs_id]
        if status is not None:
            sql, args = sql + " AND status = ?", args + [status]
        if batch_id is not None:
            sql, args = sql + " AND batch_id = ?", args + [batch_id]
        rows = self.query(sql + " ORDER BY seq", tuple(args))
        return page([store_file_object(r) for r in rows], limit, order, after, before)

    def update_store_file(self, vs_id: str, file_id: str, attributes: Any) -> dict:
        self._store_file_row(vs_id, file_id)
        attributes = validate_attributes(attributes)
        with self.tx() as db:
            db.execute("UPDATE store_files SET attributes = ? WHERE vector_store_id = ? AND file_id = ?",
                       (json.dumps(attributes), vs_id, file_id))
        return self.get_store_file(vs_id, file_id)

    def detach_file(self, vs_id: str, file_id: str) -> dict:
        self._store_file_row(vs_id, file_id)
        with self.store_lock(vs_id), self.tx() as db:
            self._remove_store_file(db, vs_id, file_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    def store_file_content(self, vs_id: str, file_id: str) -> dict:
        """The parsed text of a store file (OpenAI's vector_store.file_content.page)."""
        self._store_file_row(vs_id, file_id)
        filename, data = self.file_content(file_id)
        return {"object": "vector_store.file_content.page", "data": [{"type": "text", "text": extract_text(filename, data)}],
                "has_more": False, "next_page": None}

    # ---- batches --------------------------------------------------------------------------------
    def create_batch(self, vs_id: str, file_ids: list[str] | None = None, files: list[dict] | None = None,
                     attributes: Any = None, chunking: Any = None) -> dict:
        """file_ids share `attributes` and `chunking`; `files` items carry their own
        ({file_id, attributes, chunking_strategy}). OpenAI's rule: one of the two, not both."""
        self._store_row(vs_id)
        if bool(file_ids) == bool(files):
            raise ValueError("file_ids: give exactly one of `file_ids` or `files`, not empty")
        if files is None:
            attributes = validate_attributes(attributes)
            strategy = chunking_strategy(chunking, self.max_chunk_tokens)
            entries = [(file_id, attributes, strategy, f"file_ids[{i}]") for i, file_id in enumerate(file_ids)]
        else:
            entries = []
            for i, item in enumerate(files):
                if not isinstance(item, dict) or not isinstance(item.get("file_id"), str):
                    raise ValueError(f"files[{i}].file_id: required")
                entries.append((item["file_id"], validate_attributes(item.get("attributes"), f"files[{i}].attributes"),
                                chunking_strategy(item.get("chunking_strategy"), self.max_chunk_tokens,
                                                  f"files[{i}].chunking_strategy"), f"files[{i}].file_id"))
        known = {r["id"] for r in self.query(
            f"SELECT id FROM files WHERE id IN ({','.join('?' * len(entries))})", tuple(e[0] for e in entries))}
        for file_id, _, _, param in entries:
            if file_id not in known:
                raise NotFoundError(f"No file found with id {file_id!r}", param)
        batch_id = new_id("vsfb_")
        with self.store_lock(vs_id), self.tx() as db:
            db.execute("INSERT INTO batches (id, vector_store_id, created_at) VALUES (?, ?, ?)", (batch_id, vs_id, now()))
            for file_id, attrs, strategy, _ in {e[0]: e for e in entries}.values():
                self._remove_store_file(db, vs_id, file_id)
                self._insert_store_file(db, vs_id, file_id, attrs, strategy, batch_id)
        return self.get_batch(vs_id, batch_id)

    def _batch_row(self, vs_id: str, batch_id: str) -> sqlite3.Row:
        self._store_row(vs_id)
        rows = self.query("SELECT * FROM batches WHERE id = ? AND vector_store_id = ?", (batch_id, vs_id))
        if not rows:
            raise NotFoundError(f"No file batch {batch_id!r} in vector store {vs_id!r}", "batch_id")
        return rows[0]

    def get_batch(self, vs_id: str, batch_id: str) -> dict:
        row = self._batch_row(vs_id, batch_id)
        counts = {s: 0 for s in FILE_STATUSES}
        for r in self.query("SELECT status, COUNT(*) AS n FROM store_files WHERE batch_id = ? GROUP BY status",
                            (batch_id,)):
            counts[r["status"]] = r["n"]
        total = sum(counts.values())
        status = "cancelled" if row["cancelled"] else "in_progress" if counts["in_progress"] else \
            "failed" if total and counts["failed"] == total else "completed"
        return {"id": batch_id, "object": "vector_store.files_batch", "created_at": row["created_at"],
                "vector_store_id": vs_id, "status": status, "file_counts": {**counts, "total": total}}

    def cancel_batch(self, vs_id: str, batch_id: str) -> dict:
        """Files of the batch not yet ingested become cancelled; ingestion skips them."""
        self._batch_row(vs_id, batch_id)
        with self.tx() as db:
            db.execute("UPDATE batches SET cancelled = 1 WHERE id = ?", (batch_id,))
            db.execute("UPDATE store_files SET status = 'cancelled' WHERE batch_id = ? AND status = 'in_progress'",
                       (batch_id,))
        return self.get_batch(vs_id, batch_id)

    def list_batch_files(self, vs_id: str, batch_id: str, **kwargs) -> dict:
        self._batch_row(vs_id, batch_id)
        return self.list_store_files(vs_id, batch_id=batch_id, **kwargs)

    # ---- ingestion ------------------------------------------------------------------------------
    def pending(self) -> list[tuple[str, str]]:
        """(vector store, file) pairs still to ingest, oldest first."""
        return [(r["vector_store_id"], r["file_id"]) for r in
                self.query("SELECT vector_store_id, file_id FROM store_files WHERE status = 'in_progress' ORDER BY seq")]

    def prepare(self, vs_id: str, file_id: str) -> list[str] | None:
        """The file's chunks, by its store file's strategy; None if it is no longer in_progress
        (cancelled or detached while queued). Raises parsing's UnsupportedFile / InvalidFile for
        the caller to record with `fail`."""
        row = self._store_file_row(vs_id, file_id)
        if row["status"] != "in_progress":
            return None
        spec = json.loads(row["chunking"])["static"]
        strategy = ChunkingStrategy("static", spec["max_chunk_size_tokens"], spec["chunk_overlap_tokens"])
        filename, data = self.file_content(file_id)
        return chunk_text(extract_text(filename, data), self.tokenizer, strategy)

    def complete(self, vs_id: str, file_id: str, texts: list[str], vectors: np.ndarray) -> bool:
        return self.complete_many([(vs_id, file_id, texts, vectors)])[0]

    def complete_many(self, files: list[tuple[str, str, list[str], np.ndarray]]) -> list[bool]:
        """Store the chunks of several files, (vs id, file id, texts, L2-normalized vectors one row
        per text), and mark them completed, all in one transaction (one WAL sync for a whole
        embedding batch), then add them to the in-memory indexes. Per file: False (nothing stored)
        if it is no longer in_progress (cancelled, detached or deleted meanwhile)."""
        files = [(vs_id, file_id, texts, np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)
                  if len(texts) else np.zeros((0, 0), np.float32)) for vs_id, file_id, texts, vectors in files]
        stored, added = [], {}  # vs id -> (version before, [ids], [vectors])
        with ExitStack() as held:
            for vs_id in sorted({f[0] for f in files}):  # a fixed order: no deadlock between workers
                held.enter_context(self.store_lock(vs_id))
            with self.tx() as db:
                next_id = (db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone() or [0])[0] + 1
                for vs_id, file_id, texts, vectors in files:
                    store = db.execute("SELECT dim, version FROM vector_stores WHERE id = ?", (vs_id,)).fetchone()
                    if store is None or not db.execute(
                            "SELECT 1 FROM store_files WHERE vector_store_id = ? AND file_id = ? AND status = 'in_progress'",
                            (vs_id, file_id)).fetchone():
                        stored.append(False)
                        continue
                    if len(texts) and store["dim"] is not None and store["dim"] != vectors.shape[1]:
                        raise ValueError(f"embedding dimension {vectors.shape[1]} differs from the store's {store['dim']}")
                    ids = list(range(next_id, next_id + len(texts)))
                    next_id += len(texts)
                    db.executemany("INSERT INTO chunks (id, vector_store_id, file_id, position, text, vector) "
                                   "VALUES (?, ?, ?, ?, ?, ?)",
                                   [(i, vs_id, file_id, position, text, vector.tobytes())
                                    for position, (i, text, vector) in enumerate(zip(ids, texts, vectors))])
                    usage = sum(len(t.encode()) for t in texts) + vectors.nbytes
                    db.execute("UPDATE store_files SET status = 'completed', usage_bytes = ? "
                               "WHERE vector_store_id = ? AND file_id = ?", (usage, vs_id, file_id))
                    if ids:
                        entry = added.setdefault(vs_id, (store["version"], [], []))
                        entry[1].extend(ids)
                        entry[2].append(vectors)
                        db.execute("UPDATE vector_stores SET dim = ? WHERE id = ?", (vectors.shape[1], vs_id))
                    stored.append(True)
                for vs_id in added:
                    db.execute("UPDATE vector_stores SET version = version + 1 WHERE id = ?", (vs_id,))
            for vs_id, (version, ids, vectors) in added.items():
                cached = self.indexes.get(vs_id)
                if cached is not None and cached[0] == version:
                    cached[1].add(np.array(ids, dtype=np.int64), np.concatenate(vectors))
                    self.indexes[vs_id] = (version + 1, cached[1])
                    self.dirty.add(vs_id)
                else:
                    self.indexes.pop(vs_id, None)
        return stored

    def fail(self, vs_id: str, file_id: str, code: str, message: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE store_files SET status = 'failed', error_code = ?, error_message = ? "
                       "WHERE vector_store_id = ? AND file_id = ? AND status = 'in_progress'",
                       (code, message[:1000], vs_id, file_id))

    # ---- indexes --------------------------------------------------------------------------------
    def index_path(self, vs_id: str, version: int) -> str:
        return os.path.join(self.data_dir, "indexes", vs_id, f"v{version}.faiss")

    def index(self, vs_id: str) -> VectorIndex | None:
        """The store's index at its current version: in memory, else its file, else rebuilt."""
        row = self._store_row(vs_id)
        if row["dim"] is None:
            return None
        with self.store_lock(vs_id):
            cached = self.indexes.get(vs_id)
            if cached is not None and cached[0] == row["version"]:
                return cached[1]
            try:
                index = VectorIndex.load(row["index_kind"], row["dim"], self.index_path(vs_id, row["version"]))
            except RuntimeError:  # no file at this version (not flushed yet, or a newer one replaced it)
                index = None
            if index is None:
                rows = self.query("SELECT id, vector FROM chunks WHERE vector_store_id = ? ORDER BY id", (vs_id,))
                ids = np.array([r["id"] for r in rows], dtype=np.int64)
                vectors = np.frombuffer(b"".join(r["vector"] for r in rows), dtype=np.float32).reshape(len(rows), row["dim"])
                index = VectorIndex.build(row["index_kind"], row["dim"], ids, vectors)
                self.dirty.add(vs_id)
            self.indexes[vs_id] = (row["version"], index)
            return index

    def flush(self) -> None:
        """Write every index that changed since its last write; older versions' files go away
        (not newer ones: another process sharing the directory may have written those)."""
        for vs_id in list(self.dirty):
            with self.store_lock(vs_id):
                if vs_id not in self.dirty or vs_id not in self.indexes:
                    continue
                version, index = self.indexes[vs_id]
                index.save(self.index_path(vs_id, version))
                self.dirty.discard(vs_id)
                folder = os.path.dirname(self.index_path(vs_id, version))
                for name in os.listdir(folder):
                    if name.endswith(".faiss") and int(name[1:-len(".faiss")]) < version:
                        try:
                            os.unlink(os.path.join(folder, name))
                        except FileNotFoundError:
                            pass  # another process removed it first

    # ---- search ---------------------------------------------------------------------------------
    def search(self, vs_id: str, queries: np.ndarray, max_num_results: int = 10, filters: dict | None = None,
               score_threshold: float = 0.0) -> list[dict]:
        """Chunks nearest to any of the query vectors (L2-normalized rows), best first; `filters`
        select files by attributes before the top-k. Score: cosine clipped to [0, 1]."""
        if not isinstance(max_num_results, int) or not 1 <= max_num_results <= 50:
            raise ValueError(f"max_num_results: must be an integer in [1, 50], got {max_num_results!r}")
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"ranking_options.score_threshold: must be in [0, 1], got {score_threshold}")
        if filters is not None:
            validate_filter(filters)
        if self._store_row(vs_id)["last_active_at"] < now() - 60:  # coarse: a search is not a write
            with self.tx() as db:
                db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?", (now(), vs_id))
        index = self.index(vs_id)
        if index is None or index.size == 0:
            return []
        files = {r["file_id"]: r for r in self.query(
            "SELECT sf.file_id, sf.attributes, f.filename FROM store_files sf JOIN files f ON f.id = sf.file_id "
            "WHERE sf.vector_store_id = ? AND sf.status = 'completed'", (vs_id,))}
        allowed = None
        if filters is not None:
            keep = [f for f, r in files.items() if matches(filters, json.loads(r["attributes"]))]
            if not keep:
                return []
            allowed = np.array([r["id"] for r in self.query(
                f"SELECT id FROM chunks WHERE vector_store_id = ? AND file_id IN ({','.join('?' * len(keep))})",
                (vs_id, *keep))], dtype=np.int64)
            if not len(allowed):
                return []
        scores, ids = index.search(queries, max_num_results, allowed)
        best: dict[int, float] = {}
        for s_row, i_row in zip(scores, ids):
            for s, i in zip(s_row, i_row):
                if i >= 0:
                    best[int(i)] = max(best.get(int(i), -1.0), float(s))
        top = sorted(best.items(), key=lambda kv: -kv[1])[:max_num_results]
        chunks = {r["id"]: r for r in self.query(
            f"SELECT id, file_id, text FROM chunks WHERE id IN ({','.join('?' * len(top))})", tuple(i for i, _ in top))}
        results = []
        for chunk_id, score in top:
            score = min(1.0, max(0.0, score))
            chunk = chunks.get(chunk_id)
            if chunk is None or chunk["file_id"] not in files or score < score_threshold:
                continue  # detached after the index was read
            f = files[chunk["file_id"]]
            results.append({"file_id": chunk["file_id"], "filename": f["filename"], "score": score,
                            "attributes": json.loads(f["attributes"]),
                            "content": [{"type": "text", "text": chunk["text"]}]})
        return results


# ---- objects ------------------------------------------------------------------------------------
def file_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def store_file_object(row: sqlite3.Row) -> dict:
    error = {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None
    return {"id": row["file_id"], "object": "vector_store.file", "usage_bytes": row["usage_bytes"],
            "created_at": row["created_at"], "vector_store_id": row["vector_store_id"], "status": row["status"],
            "last_error": error, "chunking_strategy": json.loads(row["chunking"]),
            "attributes": json.loads(row["attributes"])}


def page_large(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    """/v1/files allows up to 10,000 per page."""
    items = items[::-1] if order == "desc" else items
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    data = items[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + len(data) < len(items)}


def validate_metadata(metadata: Any) -> dict[str, str]:
    """OpenAI's metadata: up to 16 string pairs, keys <= 64 and values <= 512 characters."""
    metadata = validate_attributes(metadata, "metadata")
    if any(not isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata: values must be strings")
    return metadata


def validate_expires_after(expires_after: Any) -> dict | None:
    if expires_after is None:
        return None
    if not isinstance(expires_after, dict) or expires_after.get("anchor") != "last_active_at":
        raise ValueError("expires_after.anchor: must be 'last_active_at'")
    days = expires_after.get("days")
    if not isinstance(days, int) or not 1 <= days <= 365:
        raise ValueError(f"expires_after.days: must be an integer in [1, 365], got {days!r}")
    return {"anchor": "last_active_at", "days": days}


def write_atomically(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_tree(folder: str) -> None:
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
