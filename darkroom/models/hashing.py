"""File hashes users see (CivitAI's short hash), cached by (path, size, mtime) in SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """SHA-256 per file, recomputed only when size or mtime change."""

    def __init__(self, db_path: Path | None):
        self.db_path = db_path
        self._memory: dict[tuple[str, int, int], str] = {}

    def _connect(self) -> sqlite3.Connection | None:
        if self.db_path is None:
            return None
        con = None
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.db_path, timeout=10)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(
                "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, sha256 TEXT)"
            )
            return con
        except (sqlite3.Error, OSError):  # a read-only or full home, a damaged cache: no persistent cache
            if con is not None:
                con.close()
            return None

    @staticmethod
    def _key(path: Path) -> tuple[Path, tuple[str, int, int]]:
        path = Path(path).resolve()
        st = path.stat()
        return path, (str(path), st.st_size, st.st_mtime_ns)

    def _query(self, sql: str, args: tuple = (), *, rows: bool = False) -> list | None:
        """Run one statement on the cache database; None when there is none or it fails. The cache
        is best effort: a full disk, a read-only home or a damaged cache.sqlite3 only means files
        are hashed again, never an error (the connection is closed either way)."""
        con = self._connect()
        if con is None:
            return None
        try:
            with con:
                cursor = con.execute(sql, args)
                return cursor.fetchall() if rows else []
        except sqlite3.Error:
            return None
        finally:
            con.close()

    def _lookup(self, key: tuple[str, int, int]) -> str | None:
        if key in self._memory:
            return self._memory[key]
        found = self._query("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?", key, rows=True)
        if found:
            self._memory[key] = found[0][0]
        return found[0][0] if found else None

    def sha256(self, path: Path) -> str:
        path, key = self._key(path)
        known = self._lookup(key)
        if known:
            return known
        digest = sha256_file(path)
        self._memory[key] = digest
        self._query("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*key, digest))
        return digest

    def short_hash(self, path: Path) -> str:
        """The 10-hex-digit "AutoV2" hash CivitAI shows."""
        return self.sha256(path)[:10]

    def cached_short_hash(self, path: Path) -> str | None:
        """The short hash if already known, without hashing (for instant listings)."""
        sha = self.cached_sha256(path)
        return sha[:10] if sha else None

    # ---- the library service's view (darkroom.services.model_manager): lookups without hashing, records

    def cached_sha256(self, path: Path) -> str | None:
        """The SHA-256 if known for the file as it is now (same size and mtime), without hashing."""
        return self._lookup(self._key(path)[1])

    def recorded(self, path: Path) -> tuple[int, int, str] | None:
        """(size, mtime_ns, sha256) last recorded for this path, whatever the file is now (or None)."""
        found = self._query("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path=?",
                            (str(Path(path).resolve()),), rows=True)
        return (int(found[0][0]), int(found[0][1]), found[0][2]) if found else None

    def records(self) -> list[tuple[str, int, int, str]]:
        """Every recorded (path, size, mtime_ns, sha256)."""
        found = self._query("SELECT path, size, mtime_ns, sha256 FROM file_hashes ORDER BY path", rows=True) or []
        return [(p, int(s), int(m), h) for p, s, m, h in found]

    def record(self, path: Path, sha256: str, *, size: int, mtime_ns: int) -> None:
        """Store a hash computed elsewhere (while copying or verifying) for the file at (size, mtime_ns)."""
        key = (str(Path(path).resolve()), int(size), int(mtime_ns))
        self._memory[key] = sha256
        self._query("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*key, sha256))

    def forget(self, path: Path | str) -> None:
        """Drop the record of a path (a file that is gone). `path` as `records()` gives it."""
        path = str(path)
        self._memory = {k: v for k, v in self._memory.items() if k[0] != path}
        self._query("DELETE FROM file_hashes WHERE path=?", (path,))
