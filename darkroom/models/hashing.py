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
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.db_path, timeout=10)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(
                "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, sha256 TEXT)"
            )
            return con
        except sqlite3.Error:
            return None  # a read-only home still works, just without a persistent cache

    @staticmethod
    def _key(path: Path) -> tuple[Path, tuple[str, int, int]]:
        path = Path(path).resolve()
        st = path.stat()
        return path, (str(path), st.st_size, st.st_mtime_ns)

    def _lookup(self, key: tuple[str, int, int]) -> str | None:
        if key in self._memory:
            return self._memory[key]
        con = self._connect()
        if con is None:
            return None
        with con:
            row = con.execute("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?", key).fetchone()
        con.close()
        if row:
            self._memory[key] = row[0]
        return row[0] if row else None

    def sha256(self, path: Path) -> str:
        path, key = self._key(path)
        known = self._lookup(key)
        if known:
            return known
        digest = sha256_file(path)
        self._memory[key] = digest
        con = self._connect()
        if con is not None:
            with con:
                con.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*key, digest))
            con.close()
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
        con = self._connect()
        if con is None:
            return None
        with con:
            row = con.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path=?",
                              (str(Path(path).resolve()),)).fetchone()
        con.close()
        return (int(row[0]), int(row[1]), row[2]) if row else None

    def records(self) -> list[tuple[str, int, int, str]]:
        """Every recorded (path, size, mtime_ns, sha256)."""
        con = self._connect()
        if con is None:
            return []
        with con:
            rows = con.execute("SELECT path, size, mtime_ns, sha256 FROM file_hashes ORDER BY path").fetchall()
        con.close()
        return [(p, int(s), int(m), h) for p, s, m, h in rows]

    def record(self, path: Path, sha256: str, *, size: int, mtime_ns: int) -> None:
        """Store a hash computed elsewhere (while copying or verifying) for the file at (size, mtime_ns)."""
        key = (str(Path(path).resolve()), int(size), int(mtime_ns))
        self._memory[key] = sha256
        con = self._connect()
        if con is None:
            return
        with con:
            con.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*key, sha256))
        con.close()

    def forget(self, path: Path | str) -> None:
        """Drop the record of a path (a file that is gone). `path` as `records()` gives it."""
        path = str(path)
        self._memory = {k: v for k, v in self._memory.items() if k[0] != path}
        con = self._connect()
        if con is None:
            return
        with con:
            con.execute("DELETE FROM file_hashes WHERE path=?", (path,))
        con.close()
