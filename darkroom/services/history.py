"""The history: every finished image indexed in SQLite (WAL), the PNG files the source of truth.

Files are written first (atomically, by the engine) and indexed right after, so a crash
between the two loses nothing: `reconcile()` at start-up indexes any PNG under the
outputs folder that the database does not know yet (reading its infotext) and forgets
rows whose file is gone. Paths are stored relative to the outputs folder and every path
that comes back out is checked to stay inside it.

The database can come from outside (a restored backup): one that SQLite cannot use is moved
aside, never deleted, and a fresh one is rebuilt from the images on disk. A database from an older
version (no `favourite` column) is migrated in place by adding the column.

Thumbnails for the History grid are small WebP files made once per image under `thumbs`
(home/cache/thumbs by default), stamped with their image's modification time so that a changed
image gets a new one; they are a cache: deleting the folder only costs remaking them.

An img2img or inpainting image keeps its source image and mask, so that reusing it from History
brings them back: files under `sources` (home/history-sources by default) named by the SHA-256 of
their bytes, so a source behind 20 images is stored once, and removed when the last image that
refers to it goes. A source that cannot be written (a full disk) only costs that: the image is
indexed without it, with a warning in the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from darkroom.errors import DarkroomError, InvalidRequest, StorageError
from darkroom.fsutil import discard, sqlite_storage_error, storage_error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    prompt TEXT NOT NULL DEFAULT '',
    negative_prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    width INTEGER,
    height INTEGER,
    model TEXT,
    sampler TEXT,
    steps INTEGER,
    cfg_scale REAL,
    infotext TEXT NOT NULL DEFAULT '',
    job_id TEXT,
    favourite INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS images_created ON images(created);
CREATE TABLE IF NOT EXISTS image_sources (
    image_id INTEGER PRIMARY KEY,
    source TEXT,
    mask TEXT
);
CREATE INDEX IF NOT EXISTS image_sources_source ON image_sources(source);
CREATE INDEX IF NOT EXISTS image_sources_mask ON image_sources(mask);
CREATE TRIGGER IF NOT EXISTS images_forget_sources AFTER DELETE ON images BEGIN
    DELETE FROM image_sources WHERE image_id = OLD.id;
END;
"""
log = logging.getLogger("darkroom.history")
_DELETING = ".deleting"  # the suffix of an image file renamed aside while its delete commits
SQLITE_INT = 2**63  # SQLite integers are 64-bit: an id outside [-2**63, 2**63) names no row
_BASE_COLUMNS = ("id", "path", "created", "prompt", "negative_prompt", "seed", "width", "height", "model", "sampler",
                 "steps", "cfg_scale", "infotext", "job_id")  # what every version's database has
_COLUMNS = (*_BASE_COLUMNS, "favourite")  # added later: older databases get it by migration (_open)
THUMB_SIDE = 256  # px, the longer side of a History thumbnail
THUMB_QUALITY = 78  # WebP quality of thumbnails
_SELECT = (f"SELECT {', '.join(f'images.{c}' for c in _COLUMNS)}, s.source, s.mask FROM images"
           " LEFT JOIN image_sources s ON s.image_id = images.id")
_SOURCE_NAME = re.compile(r"[0-9a-f]{64}\.(png|jpg|webp|bin)")  # what a stored source's file is called


class NotFound(DarkroomError):
    status = 404
    code = "DR-HISTORY-NOT-FOUND"


class HistoryUnavailable(DarkroomError):
    """The history database cannot be opened at all (a read-only or missing home folder)."""

    status = 503
    code = "DR-HISTORY-UNAVAILABLE"


class _Unusable(Exception):
    """The file at the history's path is not a Darkroom history database (corrupt, or another one)."""


@dataclass
class HistoryItem:
    id: int
    path: str  # relative to the outputs folder, with forward slashes
    created: float
    prompt: str
    negative_prompt: str
    seed: int | None
    width: int | None
    height: int | None
    model: str | None
    sampler: str | None
    steps: int | None
    cfg_scale: float | None
    infotext: str
    job_id: str | None
    favourite: bool = False
    source: str | None = None  # the file names under History.sources of an img2img job's source image
    mask: str | None = None  # and of its inpainting mask


class History:
    """Thread-safe SQLite index of the images under `outputs`."""

    def __init__(self, db_path: Path, outputs: Path, thumbs: Path | None = None, sources: Path | None = None):
        self.db_path = db_path
        self.outputs = outputs.resolve()
        self.thumbs = thumbs or db_path.parent / "cache" / "thumbs"
        self.sources = sources or db_path.parent / "history-sources"
        self._lock = threading.Lock()
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = _open(db_path)
            except _Unusable as e:
                aside = _move_aside(db_path)
                self._db = _open(db_path)
                added, _ = self.reconcile()
                log.warning("history: %s is not a usable database (%s); moved it to %s and started a new one with"
                            " the %d image(s) found under %s", db_path, e, aside, added, self.outputs)
        except (OSError, sqlite3.Error, _Unusable) as e:
            raise HistoryUnavailable(f"cannot open the history database {db_path}: {e}",
                                     hint="check that the home folder is writable") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- paths -------------------------------------------------------------------------------

    def relative(self, path: Path | str) -> str:
        """`path` as stored: relative to outputs; refuses anything that resolves outside it."""
        full = Path(path).resolve()
        if not _inside(full, self.outputs):
            raise InvalidRequest(f"{path} is outside the outputs folder {self.outputs}")
        return full.relative_to(self.outputs).as_posix()

    def file_of(self, item: HistoryItem) -> Path:
        """The file behind an item, refusing (as 404) anything that is not inside outputs (a
        stored path with `..`, an absolute one, a link that leads out)."""
        full = (self.outputs / item.path).resolve()
        if not _inside(full, self.outputs) or not full.is_file():
            raise NotFound(f"image {item.id} has no file under the outputs folder")
        return full

    def _own_path(self, item: HistoryItem) -> Path | None:
        """The item's own path, its folders resolved but not the file itself, so that a link
        stays the link; None when that is not a plain name in a folder inside outputs."""
        rel = Path(item.path)
        if rel.is_absolute() or ".." in rel.parts or rel.name in ("", "."):
            return None
        folder = (self.outputs / rel).parent.resolve()
        return folder / rel.name if _inside(folder, self.outputs) else None

    # --- writes ------------------------------------------------------------------------------

    def add(self, path: Path | str, infotext: str, *, job_id: str | None = None, created: float | None = None,
            source: bytes | None = None, mask: bytes | None = None) -> int:
        """Index one written image (idempotent on its path); returns its id. `source` and `mask`: the
        bytes of an img2img job's source image and inpainting mask, kept with the image."""
        from darkroom.metadata.infotext import parse_infotext

        rel = self.relative(path)
        params = parse_infotext(infotext) if infotext else None
        fields = _fields_from(params)
        created = created if created is not None else _mtime(self.outputs / rel)
        with self._lock, self._writing(f"index {rel} in the history"):
            row = self._db.execute("SELECT id FROM images WHERE path = ?", (rel,)).fetchone()
            if row:
                return row[0]
            kept = [self._keep_source(data, rel) for data in (source, mask)]  # under the lock: see _sweep_sources
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO images (path, created, prompt, negative_prompt, seed, width, height, model, sampler,"
                    " steps, cfg_scale, infotext, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rel, created, fields["prompt"], fields["negative_prompt"], fields["seed"], fields["width"],
                     fields["height"], fields["model"], fields["sampler"], fields["steps"], fields["cfg_scale"],
                     infotext or "", job_id),
                )
                item_id = int(cur.lastrowid)
                if any(kept):
                    self._db.execute("INSERT INTO image_sources (image_id, source, mask) VALUES (?,?,?)",
                                     (item_id, *kept))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                self._sweep_sources(kept)  # written for a row that never came
                raise
            return item_id

    def delete(self, item_id: int) -> HistoryItem:
        """Forget an image and delete its file: the entry's own file only (a link is removed, not
        what it points to), and never anything outside outputs.

        Both or neither: the row is deleted in a transaction, the file renamed aside to a hidden
        name, and only when the transaction commits is the hidden file removed (a failure puts the
        file back; one left hidden by a crash is removed by the next `reconcile`)."""
        item = self.get(item_id)
        own = self._own_path(item)
        aside = None
        if own is not None and (own.is_symlink() or own.is_file()):
            aside = own.with_name(f".{own.name}{_DELETING}")
        with self._lock, self._writing(f"delete image {item_id}", own.parent if own else None):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM images WHERE id = ?", (item_id,))
                if aside is not None:
                    os.replace(own, aside)
                self._commit_or_put_back(aside, own)
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the first error is the one to tell
                        self._db.execute("ROLLBACK")
                raise
        if aside is not None:
            discard(aside)
        discard(self._thumb_path(item_id))
        with self._lock:
            self._sweep_sources([item.source, item.mask])
        return item

    def delete_many(self, item_ids: list[int]) -> tuple[list[int], list[int]]:
        """Delete several images, each as `delete` does; (deleted ids, ids not in the history)."""
        deleted, missing = [], []
        for item_id in dict.fromkeys(item_ids):
            try:
                self.delete(item_id)
            except NotFound:
                missing.append(item_id)
                continue
            deleted.append(item_id)
        return deleted, missing

    def set_favourite(self, item_id: int, favourite: bool) -> HistoryItem:
        """Star or unstar an image; returns it as it is now."""
        self.get(item_id)
        with self._lock, self._writing(f"mark image {item_id} as a favourite"):
            self._db.execute("UPDATE images SET favourite = ? WHERE id = ?", (int(bool(favourite)), item_id))
        return self.get(item_id)

    # --- an img2img image's source and mask ---------------------------------------------------

    def source_file(self, item: HistoryItem, which: str = "source") -> Path:
        """The stored source image (`which="source"`) or mask (`"mask"`) of an item; NotFound when it has none."""
        name = item.source if which == "source" else item.mask if which == "mask" else None
        path = self.sources / name if name and _SOURCE_NAME.fullmatch(name) else None
        if path is None or not path.is_file():
            raise NotFound(f"image {item.id} has no stored {'mask' if which == 'mask' else 'source image'}")
        return path

    def _keep_source(self, data: bytes | None, rel: str) -> str | None:
        """Store `data` under `sources` by its hash (once, however many images use it); its file name,
        or None when there is nothing to keep or it cannot be written (the image is indexed without it)."""
        if not data:
            return None
        name = f"{hashlib.sha256(data).hexdigest()}.{_image_kind(data)}"
        dest = self.sources / name
        if dest.is_file():
            return name
        part = dest.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self.sources.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, dest)
        except OSError as e:
            discard(part)
            log.warning("history: could not keep the source image of %s in %s (%s); it is indexed without it",
                        rel, self.sources, e)
            return None
        return name

    def _sweep_sources(self, names) -> None:
        """Remove the stored sources among `names` that no image refers to any more (the caller holds the
        lock, so that an add cannot take one up in between). A failure leaves them for `reconcile`."""
        for name in dict.fromkeys(n for n in names if n):
            try:
                used = self._db.execute("SELECT 1 FROM image_sources WHERE source = ? OR mask = ? LIMIT 1",
                                        (name, name)).fetchone()
            except sqlite3.Error:
                return
            if not used and _SOURCE_NAME.fullmatch(name):
                discard(self.sources / name)

    def _remove_unused_sources(self) -> None:
        """Remove stored sources no row refers to (left by a crash or a forgotten image) and temp files."""
        if not self.sources.is_dir():
            return
        with self._lock:
            try:
                used = {n for row in self._db.execute("SELECT source, mask FROM image_sources") for n in row if n}
            except sqlite3.Error:
                return
            for f in self.sources.iterdir():
                if f.is_file() and f.name not in used and (_SOURCE_NAME.fullmatch(f.name) or f.name.endswith(".part")):
                    discard(f)

    # --- thumbnails --------------------------------------------------------------------------

    def _thumb_path(self, item_id: int) -> Path:
        return self.thumbs / f"{int(item_id)}.webp"

    def thumbnail(self, item: HistoryItem) -> Path:
        """A small WebP of the item's image (longer side THUMB_SIDE), made on first use and kept in
        `thumbs`; remade when the image's modification time differs from the one stamped on it."""
        from PIL import Image, UnidentifiedImageError

        source = self.file_of(item)
        stamp = source.stat().st_mtime_ns
        thumb = self._thumb_path(item.id)
        with contextlib.suppress(OSError):
            if thumb.stat().st_mtime_ns == stamp:
                return thumb
        try:
            with Image.open(source) as im:
                im.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a reduced scale
                im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
                small = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise NotFound(f"image {item.id} cannot be read for a thumbnail: {e}") from None
        with self._writing(f"write a thumbnail of image {item.id}", self.thumbs):
            self.thumbs.mkdir(parents=True, exist_ok=True)
            part = thumb.with_name(f".{thumb.name}.{os.getpid()}.{threading.get_ident()}.part")
            try:
                small.save(part, "WEBP", quality=THUMB_QUALITY, method=4)
                os.utime(part, ns=(stamp, stamp))
                os.replace(part, thumb)
            except BaseException:
                discard(part)
                raise
        return thumb

    def _commit_or_put_back(self, aside: Path | None, own: Path | None) -> None:
        """COMMIT; if that fails, the file renamed aside gets its name back before the error goes on."""
        try:
            self._db.execute("COMMIT")
        except BaseException:
            if aside is not None and own is not None:
                try:
                    os.replace(aside, own)
                except OSError:
                    log.warning("history: could not put %s back after a failed delete; it is %s", own, aside)
            raise

    @contextlib.contextmanager
    def _writing(self, doing: str, folder: Path | None = None) -> Iterator[None]:
        """A write to the database (or a file in `folder`) that fails for the disk's sake is a StorageError
        naming the folder; another database failure a HistoryUnavailable, never a traceback."""
        try:
            yield
        except sqlite3.Error as e:
            raise (sqlite_storage_error(e, self.db_path.parent, doing) or HistoryUnavailable(
                f"cannot {doing}: the history database {self.db_path} failed ({e})",
                hint="restart Darkroom; a damaged database is set aside and rebuilt from the images")) from e
        except OSError as e:
            raise storage_error(e, folder or self.outputs, doing) from e

    def reconcile(self) -> tuple[int, int]:
        """Index images (PNG, JPEG, WebP) the database lacks and drop rows whose file is gone; (added, dropped)."""
        from darkroom.metadata.images import read_image_metadata

        with self._lock:
            known = {p for (p,) in self._db.execute("SELECT path FROM images")}
        added = dropped = 0
        on_disk: set[str] = set()
        if self.outputs.is_dir():
            found = (p for p in self.outputs.rglob("*") if p.suffix in (".png", ".jpg", ".webp"))  # samples_format
            for png in sorted(found):
                if png.name.startswith(".") or png.is_symlink():
                    continue  # temp files of an interrupted write; links could point anywhere
                rel = png.relative_to(self.outputs).as_posix()
                on_disk.add(rel)
                if rel in known:
                    continue
                try:
                    meta = read_image_metadata(png)
                except DarkroomError:
                    continue  # a damaged or foreign file: leave it alone, do not index it
                try:
                    self.add(png, meta.parameters or "")
                except StorageError as e:  # a full or read-only disk: the rest waits for the next start
                    log.warning("history: %s; the images not indexed yet are indexed at the next start", e)
                    return added, dropped
                added += 1
        try:
            with self._lock, self._writing("forget the images that are gone from the history"):
                for rel in known - on_disk:
                    self._db.execute("DELETE FROM images WHERE path = ?", (rel,))
                    dropped += 1
        except StorageError as e:
            log.warning("history: %s; they are forgotten at the next start", e)
        self._remove_deleted_leftovers()
        self._remove_unused_sources()
        return added, dropped

    def _remove_deleted_leftovers(self) -> None:
        """Remove the hidden files of deletes that a crash or a read-only moment left behind."""
        if self.outputs.is_dir():
            for left in self.outputs.rglob(f".*{_DELETING}"):
                if not left.is_dir():
                    discard(left)

    # --- reads -------------------------------------------------------------------------------

    def get(self, item_id: int) -> HistoryItem:
        if not -SQLITE_INT <= item_id < SQLITE_INT:
            raise NotFound(f"no image {item_id} in the history")
        with self._lock:
            row = self._db.execute(f"{_SELECT} WHERE images.id = ?", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"no image {item_id} in the history")
        return self._checked(_item(row))

    def _checked(self, item: HistoryItem) -> HistoryItem:
        """The item, without the sources whose file is gone (a home restored from a backup has none)."""
        for which in ("source", "mask"):
            name = getattr(item, which)
            if name and not (_SOURCE_NAME.fullmatch(name) and (self.sources / name).is_file()):
                setattr(item, which, None)
        return item

    def search(self, query: str = "", *, page: int = 1, per_page: int = 24,
               favourites: bool = False) -> tuple[int, list[HistoryItem]]:
        """Newest first. Every word of `query` must match (any order, case-insensitive) the prompt,
        negative prompt, model or sampler, or be the seed; `favourites` keeps starred images only."""
        if page < 1 or not 1 <= per_page <= 500:
            raise InvalidRequest("page must be >= 1 and per_page between 1 and 500")
        clauses, args = [], []
        for word in query.split():
            like = f"%{_escape_like(word)}%"
            text = " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in _SEARCHED)
            seed = _seed(word) if word.isdigit() else None
            clauses.append(f"({text}{' OR seed = ?' if seed is not None else ''})")
            args += [like] * len(_SEARCHED) + ([seed] if seed is not None else [])
        if favourites:
            clauses.append("favourite != 0")
        where = " AND ".join(clauses) or "1"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM images WHERE {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"{_SELECT} WHERE {where} ORDER BY images.created DESC, images.id DESC"
                " LIMIT ? OFFSET ?", [*args, per_page, min((page - 1) * per_page, SQLITE_INT - 1)],
            ).fetchall()
        return total, [self._checked(_item(r)) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


_SEARCHED = ("prompt", "negative_prompt", "model", "sampler")  # the text columns a search looks in


def _open(db_path: Path) -> sqlite3.Connection:
    """A connection to a usable history database (an empty or missing file becomes one);
    _Unusable when the file is not SQLite, is damaged, or holds an images table of another shape."""
    db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall() if row[0] != "ok"]
        if problems:
            raise _Unusable(f"damaged: {problems[0]}")
        columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
        if columns and (missing := [c for c in _BASE_COLUMNS if c not in columns]):
            raise _Unusable(f"its images table has no column {missing[0]!r}")
        if columns and "favourite" not in columns:  # a database from before favourites
            db.execute("ALTER TABLE images ADD COLUMN favourite INTEGER NOT NULL DEFAULT 0")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as e:
        db.close()
        if (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            raise _Unusable(str(e)) from None
        raise
    except _Unusable:
        db.close()
        raise
    return db


def _move_aside(db_path: Path) -> Path:
    """Rename the database (with its -wal and -shm files, which belong to it) to
    `<name>.corrupt-<time>`: kept for the user, out of the way of the new one."""
    stamp = f"{db_path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = db_path.with_name(stamp), 1
    while aside.exists():
        n += 1
        aside = db_path.with_name(f"{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):
        part = db_path.with_name(db_path.name + suffix)
        if part.exists():
            os.replace(part, aside.with_name(aside.name + suffix))
    return aside


def _inside(path: Path, folder: Path) -> bool:
    return os.path.commonpath([path, folder]) == str(folder)


def _image_kind(data: bytes) -> str:
    """The file extension a source's bytes call for (PNG, JPEG, WebP; anything else is kept as .bin)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _int(value) -> int | None:
    """A number from an image's infotext, or None when it is not one SQLite can hold (a foreign
    file may say anything)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if -SQLITE_INT <= number < SQLITE_INT else None


def _seed(value) -> int | None:
    """A seed as stored: seeds go up to 2**64-1 but SQLite's integers are signed 64-bit, so the
    upper half is kept as its two's-complement (`_item` turns it back)."""
    try:
        seed = int(value)
    except (TypeError, ValueError):
        return None
    if not 0 <= seed < 2 * SQLITE_INT:
        return None
    return seed - 2 * SQLITE_INT if seed >= SQLITE_INT else seed


def _item(row) -> HistoryItem:
    item = HistoryItem(*row)
    item.favourite = bool(item.favourite)
    if item.seed is not None and item.seed < 0:
        item.seed += 2 * SQLITE_INT
    return item


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fields_from(p: dict[str, str] | None) -> dict:
    p = p or {}
    width, height = None, None
    if "Size" in p and "x" in str(p["Size"]):
        w, _, h = str(p["Size"]).partition("x")
        width, height = _int(w), _int(h)
    return {"prompt": p.get("Prompt", ""), "negative_prompt": p.get("Negative prompt", ""),
            "seed": _seed(p.get("Seed")), "width": width, "height": height, "model": p.get("Model"),
            "sampler": p.get("Sampler"),
            "steps": _int(p.get("Steps")), "cfg_scale": _float(p.get("CFG scale"))}
