"""The service objects a server runs on, built once at start-up and passed to every route.

`Studio` bundles the engine, the job queue, the history and the settings so that the web
UI, the native API, the A1111 API and the OpenAI API share one queue and one model cache,
and each interface stays a thin translation layer.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from darkroom.api import build_engine, output_folder
from darkroom.errors import DarkroomError, ModelNotFound
from darkroom.home import Home
from darkroom.models.library import diffusers_weights
from darkroom.request import GenerationRequest
from darkroom.services.history import History
from darkroom.services.jobs import JobQueue
from darkroom.settings import Settings

log = logging.getLogger("darkroom.studio")


@dataclass
class ModelInfo:
    name: str
    title: str  # "name [shorthash]", as the A1111 API lists models
    family: str
    size: str
    size_bytes: int
    hash: str | None
    sha256: str | None
    path: str
    native_size: int | None
    error: str | None = None
    current: bool = False
    preview: str | None = None  # an image beside the file: name.preview.png, name.png, name.jpg, ...


PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg",
                    ".webp")


def _path_like(reference: str) -> bool:
    """Whether a client's model reference is written as a path rather than a name."""
    return any(sep in reference for sep in ("/", "\\")) or reference.startswith("~")


def preview_beside(path: Path) -> str | None:
    """The preview image users keep next to a model (the webui's and CivitAI helpers' names)."""
    stem = path.name if path.is_dir() else path.stem
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.with_name(stem + suffix)
        if candidate.is_file() and not candidate.is_symlink():
            return str(candidate)
    return None


@dataclass
class Studio:
    home: Home
    engine: object
    queue: JobQueue
    history: History
    settings: Settings
    started: float = 0.0
    hashing: dict | None = None  # {"done": bytes, "total": bytes} while hash_missing runs
    hash_thread: threading.Thread | None = field(default=None, repr=False)
    importing: dict | None = None  # the last import_models: progress while it runs, then its outcomes
    _models: list[ModelInfo] | None = field(default=None, repr=False)

    # --- models ------------------------------------------------------------------------------

    def models(self, *, refresh: bool = False) -> list[ModelInfo]:
        """Checkpoints in the library (scanned once, then cached until `refresh`)."""
        from darkroom.humanize import human_size

        if self._models is None or refresh:
            library = self.engine.library
            rows = []
            for e in library.scan():
                if e.detection is not None and e.detection.kind not in ("checkpoint",):
                    continue  # LoRAs, VAEs, embeddings dropped into the checkpoints folder
                # cached hashes only: hashing 50 GB of models must never block a listing (see hash_missing)
                target = diffusers_weights(e.path) if e.is_diffusers else e.path
                sha = None if e.error or target is None else library.hashes.cached_sha256(target)
                short = sha[:10] if sha else None
                sha = None if e.is_diffusers else sha
                family = ("diffusers folder" if e.is_diffusers else
                          (e.detection.label if e.detection else "?")) if not e.error else "unreadable"
                rows.append(ModelInfo(
                    name=e.name, title=f"{e.name} [{short}]" if short else e.name, family=family,
                    size=human_size(e.size), size_bytes=e.size, hash=short, sha256=sha, path=str(e.path),
                    native_size=None if e.error else library.native_size(e), error=e.error,
                    preview=preview_beside(e.path),
                ))
            self._models = rows
        current = self.current_model()
        for m in self._models:
            m.current = m.name == current
        return list(self._models)

    def hash_missing(self) -> threading.Thread:
        """Hash the model files not hashed yet, in a background thread, with progress in `hashing`."""
        from darkroom.services.model_manager import ModelManager, Progress

        studio = self

        class Counter(Progress):
            def start(self, total: int, label: str) -> None:
                studio.hashing = {"done": 0, "total": total}

            def advance(self, n: int) -> None:
                studio.hashing["done"] += n

        def run() -> None:
            try:
                ModelManager(self.home, self.engine.library.hashes).rescan(Counter())
            except Exception:  # a file vanished or is unreadable: listings just show no hash for it
                log.exception("background hashing failed")
            finally:
                self.hashing = None
                self._models = None  # the next listing shows the new hashes

        thread = threading.Thread(target=run, name="darkroom-hashing", daemon=True)
        thread.start()
        return thread

    def import_models(self, sources: list[str], *, kind: str = "auto") -> threading.Thread:
        """`darkroom models import` in a background thread (the same verified copy), with progress and
        then the per-file outcomes in `importing`. Paths that do not exist are refused before it starts."""
        from darkroom.services.model_manager import KINDS, ImportStopped, ModelManager, Progress

        if kind != "auto" and kind not in KINDS:
            raise DarkroomError(f"unknown kind {kind!r}; auto, {', '.join(KINDS)}")
        if self.importing and self.importing["running"]:
            raise ImportBusy("an import is already running; wait for it to finish")
        paths = [Path(p).expanduser() for p in sources if str(p).strip()]
        if not paths:
            raise DarkroomError("name a model file or a folder to import")
        for p in paths:
            if not p.is_absolute() or not p.exists():
                raise ModelNotFound(f"no such file or folder: {p} (give the full path, e.g. /media/usb/models)")
        state = self.importing = {"running": True, "label": "starting", "done": 0, "total": 0, "outcomes": [],
                                  "error": None}

        class Bar(Progress):
            def start(self, total: int, label: str) -> None:
                state.update(done=0, total=total, label=label)

            def label(self, text: str) -> None:
                state["label"] = text

            def advance(self, n: int) -> None:
                state["done"] += n

        def run() -> None:
            try:
                outcomes = ModelManager(self.home, self.engine.library.hashes).import_paths(
                    paths, kind=kind, progress=Bar())
            except ImportStopped as e:
                outcomes, state["error"] = e.outcomes, str(e)
            except Exception as e:  # noqa: BLE001  (told to the page, not a dead thread)
                log.exception("model import failed")
                outcomes, state["error"] = [], str(e) if isinstance(e, DarkroomError) else f"import failed: {e}"
            state["outcomes"] = [o.to_dict() for o in outcomes]
            self._models = None  # the next listing shows the new files
            state.update(running=False, label="done")

        thread = threading.Thread(target=run, name="darkroom-import", daemon=True)
        thread.start()
        return thread

    def set_models_dirs(self, folders: list[str]) -> list[str]:
        """Use these A1111/Forge/ComfyUI roots or plain folders in place (the `models_dirs` setting),
        now and at every start; folders given with --models-dir stay in use."""
        dirs = [Path(f).expanduser() for f in dict.fromkeys(str(f).strip() for f in folders) if f]
        for d in dirs:
            if not d.is_absolute() or not d.is_dir():
                raise ModelNotFound(f"no such folder: {d} (give the full path of the webui or ComfyUI folder)")
        old = {Path(p).expanduser().resolve() for p in self.settings.get("models_dirs") or []}
        self.settings.update(models_dirs=[str(d) for d in dirs])
        kept = [d for d in self.home.extra_model_dirs if d not in old]
        self.home.extra_model_dirs = list(dict.fromkeys([*kept, *(d.resolve() for d in dirs)]))
        self._models = None
        return list(self.settings.get("models_dirs"))

    def current_model(self) -> str | None:
        """The selected checkpoint's name; else what a request without a model would use."""
        chosen = self.settings.get("current_model")
        if chosen:
            return chosen
        try:
            return Path(self.engine.model_path(GenerationRequest())).stem
        except DarkroomError:
            return None

    def select_model(self, name: str) -> str:
        """Make `name` the default checkpoint (validated now; loaded by the next job)."""
        path = self.library_checkpoint(name)
        entry = self.engine.library.describe(path)
        if entry.error:
            raise DarkroomError(f"{entry.name}: {entry.error}")
        self.settings.update(current_model=entry.name)
        return entry.name

    def library_checkpoint(self, reference: str) -> Path:
        """The checkpoint a client names, as a file the library lists: by name, short hash, or a path
        inside the models folders.

        Clients reach the server over HTTP, so a reference is never opened as an arbitrary path (nor
        as a name relative to the server's folder), and a reference outside the library gets the same
        message whether or not such a file exists: no route reads, or tells about, other files.
        """
        library = self.engine.library
        found = None
        if _path_like(reference):
            real = os.path.realpath(os.path.expanduser(reference))
            found = next((e.path for e in library.scan() if os.path.realpath(e.path) == real), None)
        else:  # names and hashes match only the library's own entries
            try:
                found = library.resolve(reference, paths=False)
            except ModelNotFound:
                found = None
        if found is None:
            names = ", ".join(sorted({e.name for e in library.scan()})) or "none"
            raise ModelNotFound(f"no model {reference!r} in the library (available: {names}); name one of those, or"
                                f" put the file in {self.home.checkpoints}")
        return found

    def library_vae(self, reference: str) -> str:
        """A client's VAE choice as a VAE file the library lists (the rule of `library_checkpoint`);
        "Automatic", "None" and "" pass through."""
        text = reference.strip()
        if text.lower() in ("", "automatic", "none"):
            return reference
        listed = {os.path.realpath(e.path): e for e in self.engine.vaes.scan()}
        if _path_like(text):
            entry = listed.get(os.path.realpath(os.path.expanduser(text)))
        else:
            entry = next((e for e in listed.values()
                          if text.lower() in (e.name.lower(), e.path.name.lower(), e.path.stem.lower())), None)
        if entry is None:
            names = ", ".join(sorted(e.name for e in listed.values())) or "none"
            raise ModelNotFound(f"no VAE {reference!r} in the library (available: {names}); put VAE files in"
                                f" {self.home.vae}")
        return str(entry.path)

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Fill what the request leaves to the settings (the selected model, clip skip), and pin its
        model and VAE to files the library lists (see `library_checkpoint`)."""
        update = {}
        if request.model is None and self.settings.get("current_model"):
            update["model"] = self.settings.get("current_model")
        if request.vae is None and self.settings.get("vae"):
            update["vae"] = self.settings.get("vae")
        if request.clip_skip == 1 and int(self.settings.get("clip_skip") or 1) != 1:
            update["clip_skip"] = int(self.settings.get("clip_skip"))
        if request.token_merging_ratio is None:  # the webui's rule: img2img's own option, else the common one
            own = self.settings.get("token_merging_ratio_img2img") if request.init_image is not None else 0
            update["token_merging_ratio"] = float(own or self.settings.get("token_merging_ratio") or 0)
        if request.token_merging_ratio_hr is None:
            update["token_merging_ratio_hr"] = float(self.settings.get("token_merging_ratio_hr") or 0)
        for name, setting in (("output_format", "samples_format"), ("output_quality", "jpeg_quality"),
                              ("output_lossless", "webp_lossless")):  # how outputs are saved (webui options)
            if getattr(request, name) is None:
                update[name] = self.settings.get(setting)
        model = update.get("model", request.model)
        if model is not None:
            update["model"] = str(self.library_checkpoint(model))
        vae = update.get("vae", request.vae)
        if vae is not None:
            update["vae"] = self.library_vae(vae)
        return request.model_copy(update=update) if update else request

    def vae_choice(self, value) -> str | None:
        """A webui `sd_vae` value as a request's `vae`: a listed VAE file's name, or None for the checkpoint's."""
        from darkroom.errors import ModelNotFound

        if value in (None, "", "Automatic", "None"):
            return None
        names = {e.name: e.name for e in self.engine.vaes.scan()}
        names |= {Path(n).stem: n for n in list(names)}
        if str(value) not in names:
            raise ModelNotFound(f"no VAE named {value!r}; available: {', '.join(sorted(set(names.values()))) or 'none'}"
                                f" (put VAE files in {self.home.vae})")
        return names[str(value)]

    def embeddings(self) -> dict[str, dict[str, dict]]:
        """The webui-shaped embeddings list: matched against the loaded model when one is loaded
        (no model is loaded just to answer this), else every readable file as "loaded"."""
        library = self.engine.embeddings
        model = self.engine.cache.current
        if model is not None:
            return library.for_model(model).a1111()
        files, errors = library.scan()
        return {"loaded": {f.path.stem: f.a1111() for f in files},
                "skipped": {e.name: {"error": e.reason} for e in errors}}

    def close(self) -> None:
        self.queue.stop()
        self.history.close()


class ImportBusy(DarkroomError):
    status = 409
    code = "DR-IMPORT-BUSY"


def build_studio(home: Home, *, device: str | None = None, precision: str | None = None, allow_pickle: bool = False,
                 max_queue: int = 100, start: bool = True, vram: str | None = None, fp8: bool = False) -> Studio:
    """Everything `darkroom serve` runs on; `start=False` leaves the worker thread off (tests)."""
    import time

    home = home.ensure()
    engine = build_engine(home, device=device, precision=precision, allow_pickle=allow_pickle, vram=vram, fp8=fp8)
    history = History(home.root / "history.sqlite3", home.outputs)
    added, dropped = history.reconcile()
    if added or dropped:
        log.info("history: indexed %d image(s) found on disk, forgot %d missing", added, dropped)
    settings = Settings(home.root / "settings.json")
    from darkroom.engine.admission import Limits

    engine.limits = Limits.from_settings(settings)  # the maxima every request is admitted against (docs/limits.md)
    settings.listeners.append(lambda values: setattr(engine, "limits", Limits.from_values(values)))
    engine.faces.configure(settings.as_dict())  # restore_faces: the model and CodeFormer weight settings
    settings.listeners.append(engine.faces.configure)
    studio = Studio(home=home, engine=engine, queue=None, history=history, settings=settings,  # type: ignore[arg-type]
                    started=time.time())
    def outputs_for(req: GenerationRequest) -> Path:
        return output_folder(home, "img2img" if req.is_img2img else "txt2img")

    studio.queue = JobQueue(engine, output_dir=outputs_for, history=history, max_pending=max_queue,
                            prepare=studio.prepare)
    if start:
        studio.queue.start()
        studio.hash_thread = studio.hash_missing()
    return studio
