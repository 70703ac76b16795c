"""Offline readiness: will this installation work with the network cable pulled?

Answered from what is on disk, quickly (the checks `darkroom doctor` prints): every
checkpoint's header reads and its family is supported, its diffusers configs can be derived
from its tensor shapes, the CLIP tokenizer and the web UI's assets ship with the package, the
Hugging Face stack is switched offline, the network guard is installed, what the guard has
recorded, and how the last offline proof (`darkroom.offline.proof`) ended.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import darkroom
from darkroom.errors import DarkroomError
from darkroom.home import Home, is_folder
from darkroom.humanize import human_size
from darkroom.offline import guard as offline

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PROOF_DIR = "offline-proof"  # under the home's logs folder


def proof_dir(home: Home) -> Path:
    return home.logs / PROOF_DIR


# --- readiness -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    reason: str


def environment(home: Home, *, device: str | None = None, precision: str | None = None) -> dict:
    """What `darkroom doctor` has always shown: versions, device, folders, the guard and its record."""
    import diffusers
    import torch
    import transformers

    from darkroom.engine.device import choose_device

    choice = choose_device(device, precision)
    return {
        "darkroom": darkroom.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(choice.device),
        "precision": choice.precision,
        "device_reason": choice.reason,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "home": str(home.root),
        "model_folders": [{"path": str(d), "exists": is_folder(d)} for d in home.checkpoint_dirs()],
        "offline_switches": {k: os.environ.get(k) for k in offline.OFFLINE_ENV},
        "guard_installed": _guard_active(),
        "network_log": str(home.network_log),
        "blocked_attempts": [asdict(a) for a in offline.read_log(home.network_log)],
    }


def _guard_active() -> bool:
    """The socket layer is actually patched by darkroom.offline.guard (not merely a guard object existing)."""
    return all(getattr(fn, "__module__", None) == offline.__name__
               for fn in (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo))


def _check_switches() -> Check:
    import huggingface_hub
    from huggingface_hub import constants

    wrong = [k for k, v in offline.OFFLINE_ENV.items() if os.environ.get(k) != v]
    if wrong:
        return Check("offline switches", FAIL, f"not set: {', '.join(wrong)} (something changed them after start-up)")
    if not (constants.HF_HUB_OFFLINE and huggingface_hub.is_offline_mode() and constants.HF_HUB_DISABLE_TELEMETRY):
        return Check("offline switches", FAIL, "huggingface_hub was imported before darkroom and is not in offline"
                     " mode: import darkroom first")
    return Check("offline switches", OK, "HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_HUB_DISABLE_TELEMETRY, DO_NOT_TRACK"
                 " set; huggingface_hub reports offline mode")


def _check_guard(home: Home) -> list[Check]:
    checks = [Check("network guard", OK, "installed: connections to non-loopback addresses are refused and recorded")
              if _guard_active() else
              Check("network guard", FAIL, "not installed: socket.connect is not patched by darkroom.offline.guard")]
    attempts = offline.read_log(home.network_log)
    if attempts:
        last = attempts[-1]
        checks.append(Check("guard record", WARN, f"{len(attempts)} blocked attempt(s) in {home.network_log}; last"
                            f" {last.when} to {last.host}:{last.port} from {last.caller}"))
    else:
        checks.append(Check("guard record", OK, f"no outbound attempt recorded ({home.network_log})"))
    return checks


def _check_tokenizer() -> Check:
    from darkroom.text.tokenizer import _asset_dir, load_clip_tokenizer

    try:
        tok = load_clip_tokenizer()
    except DarkroomError as e:
        return Check("tokenizer", FAIL, str(e))
    return Check("tokenizer", OK, f"CLIP tokenizer ({len(tok)} tokens) ships in {_asset_dir()}")


_EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|"""
                       r"""@import\s+["']?(?:https?:)?//|fetch\(\s*["'](?:https?:)?//""", re.I)


def _check_web_ui() -> Check:
    static = Path(darkroom.__file__).parent / "server" / "static"
    files = [p for p in static.rglob("*") if p.is_file() and p.suffix in (".html", ".js", ".css")]
    bad = [f"{p.name}:{text[: m.start()].count(chr(10)) + 1}" for p in files
           for text in [p.read_text(encoding="utf-8", errors="replace")] for m in _EXTERNAL.finditer(text)]
    if bad:
        return Check("web UI assets", FAIL, f"reference outside URLs: {', '.join(bad[:5])}")
    return Check("web UI assets", OK, f"{len(files)} files, none loads anything from outside (CSP default-src 'self')")


def _check_starter() -> Check:
    from darkroom.models.starter import STARTER_FILE

    if STARTER_FILE.exists():
        size = human_size(STARTER_FILE.stat().st_size)
        return Check("starter model", OK, f"ships with Darkroom ({STARTER_FILE.name}, {size})")
    return Check("starter model", WARN, "not in this installation: a tiny random demo model is built locally on"
                 " first use (no download)")


def _derive_configs(path: Path, family_id: str, v_prediction: bool) -> list[str]:
    """Build every component's config from the header alone, as loading will; names the parts."""
    from transformers import CLIPTextConfig

    from darkroom.models import configs
    from darkroom.models.families import FAMILIES
    from darkroom.models.header import read_header

    header = read_header(path)
    family = FAMILIES[family_id]
    overrides = configs.metadata_overrides(header)
    configs.unet_config(header, family.id, overrides.get("unet"), v_prediction=v_prediction)
    configs.vae_config(header, family.id, overrides=overrides.get("vae"))
    parts = ["UNet", "VAE"]
    for i, (prefix, layout) in enumerate(family.text_encoders):
        is_sdxl_g = family.id.startswith("sdxl") and layout == "openclip"
        cfg = configs.text_encoder_config(
            header, prefix, layout, drop_last_layer=family.id == "sd2", with_projection=is_sdxl_g,
            overrides=overrides.get("text_encoder_2" if i == 1 or family.id == "sdxl-refiner" else "text_encoder"))
        CLIPTextConfig(**cfg)
        parts.append(f"text encoder {i + 1}" if len(family.text_encoders) > 1 else "text encoder")
    return parts


def _check_diffusers_folder(folder: Path) -> Check:
    from darkroom.errors import ModelLoadError
    from darkroom.models.library import has_component, read_model_index

    name = f"model {folder.name}"
    try:
        index = read_model_index(folder)
    except ModelLoadError as e:
        return Check(name, FAIL, str(e).removeprefix(f"{folder.name}: "))
    wanted = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if has_component(index, c)]
    missing = [f"{c}/config.json" for c in wanted if not (folder / c / "config.json").is_file()]
    missing += [f"{c}/ weights" for c in wanted if (folder / c).is_dir() and not any(
        p.suffix in (".safetensors", ".bin") for p in (folder / c).iterdir())]
    if missing:
        return Check(name, FAIL, f"diffusers folder incomplete: missing {', '.join(missing)}")
    return Check(name, OK, f"diffusers folder: {', '.join(wanted)} configs and weights present")


def _check_model(entry, deep: bool) -> Check:
    from darkroom.errors import ModelLoadError

    name = f"model {entry.name}"
    if entry.error:
        return Check(name, FAIL, entry.error)
    if entry.is_diffusers:
        check = _check_diffusers_folder(entry.path)
    else:
        d = entry.detection
        if entry.path.suffix.lower() != ".safetensors":
            return Check(name, WARN, "pickle checkpoint: its family is known only once loaded, which needs"
                         " --allow-pickle; prefer a .safetensors copy")
        if d.kind == "unsupported":
            return Check(name, FAIL, f"not supported: detected {d.detail}")
        if d.kind in ("lora", "vae", "embedding"):
            where = {"lora": "models/loras", "vae": "models/vae", "embedding": "models/embeddings"}[d.kind]
            return Check(name, WARN, f"a {d.detail}, not a checkpoint: it belongs in {where}")
        if d.kind != "checkpoint":
            return Check(name, FAIL, d.detail or "not a Stable Diffusion checkpoint")
        try:
            parts = _derive_configs(entry.path, d.family, d.v_prediction)
        except (ModelLoadError, KeyError, StopIteration, IndexError, ValueError, TypeError) as e:
            return Check(name, FAIL, f"{d.label}: configs cannot be derived from its tensor shapes ({e})")
        check = Check(name, OK, f"{d.label}, {human_size(entry.size)}: header read, {', '.join(parts)} configs derived"
                      " from tensor shapes (nothing to download)")
    if deep and check.status == OK:
        check = _deep_load(entry, check)
    return check


def _deep_load(entry, check: Check) -> Check:
    """Load the whole model on the CPU (half precision to spare memory), as generation will."""
    import torch

    from darkroom.models.loader import LoadOptions, load_checkpoint

    start = time.perf_counter()
    try:
        model = load_checkpoint(entry.path, LoadOptions(dtype=torch.float16, vae_dtype=torch.float16))
    except DarkroomError as e:
        return Check(check.name, FAIL, f"header fine, but loading failed: {e}")
    del model
    return Check(check.name, OK, f"{check.reason}; loaded fully in {time.perf_counter() - start:.1f} s")


def _check_settings(settings) -> list[Check]:
    """What of settings.json was ignored (Settings falls back to defaults rather than fail)."""
    if settings.problems:
        return [Check("settings", WARN, line) for line in settings.problems]
    path = settings.path
    return [Check("settings", OK, f"{path} read" if path.is_file() else "defaults (no settings.json yet)")]


def _check_default_model(settings, library) -> Check:
    from darkroom.models.starter import STARTER_FILE, description

    selected = settings.get("current_model")
    if selected:
        try:
            path = library.resolve(selected)
        except DarkroomError as e:
            return Check("default model", FAIL, f"the selected model is gone: {e}")
        return Check("default model", OK, f"{Path(path).stem} (selected in settings)")
    for e in library.scan():
        if e.error is None and (e.detection is None or e.detection.kind == "checkpoint"):
            note = description(e.path)
            return Check("default model", OK, f"{e.name} ({note or 'first checkpoint in the models folders'})")
    if STARTER_FILE.exists():
        return Check("default model", OK, f"{STARTER_FILE.stem} (built-in starter)")
    return Check("default model", OK, "built-in tiny random model, made locally on first use")


def _check_downloads(checks: list[Check]) -> Check:
    """Nothing is fetched on first use: derived from the checks above (tokenizer, switches, configs)."""
    pending = [c.name for c in checks if c.status == FAIL and c.name in ("tokenizer", "offline switches")]
    pending += [c.name for c in checks if c.status == FAIL and c.name.startswith("model ")
                and ("configs" in c.reason or "diffusers folder" in c.reason)]
    if pending:
        return Check("first-run downloads", FAIL, f"would be needed for: {', '.join(pending)} (see above);"
                     " Darkroom never downloads, so these cannot work")
    return Check("first-run downloads", OK, "none pending: configs come from tensor shapes, the tokenizer and the"
                 " starter model ship with Darkroom, the hub is switched off")


def _check_last_proof(home: Home) -> Check:
    path = proof_dir(home) / "report.json"
    if not path.is_file():
        return Check("offline proof", WARN, "not run yet on this machine: `darkroom doctor --prove-offline`")
    try:
        last = json.loads(path.read_text(encoding="utf-8"))
        when, how = last.get("finished", "?"), last.get("isolation", {}).get("mode", "?")
        outbound = len(last.get("outbound", []))
    except (OSError, ValueError, AttributeError):
        return Check("offline proof", WARN, f"last report unreadable ({path}); run it again")
    if outbound:
        return Check("offline proof", FAIL, f"last run ({when}) saw {outbound} outbound attempt(s): {path}")
    if not last.get("ok"):
        return Check("offline proof", WARN, f"last run ({when}) did not complete: {path}")
    return Check("offline proof", OK, f"passed {when} ({how})")


def readiness_checks(home: Home, *, deep: bool = False) -> list[Check]:
    """Every offline-readiness check, fast by default (headers only); `deep` loads every model too."""
    from darkroom.models.library import ModelLibrary
    from darkroom.settings import Settings

    library = ModelLibrary(home)
    settings = Settings(home.root / "settings.json")
    checks = [_check_switches(), *_check_guard(home), _check_tokenizer(), _check_web_ui(), _check_starter()]
    checks += _check_settings(settings)
    entries = library.scan()
    checks += [Check("models folders", WARN, line) for line in library.problems]
    checks += [_check_model(e, deep) for e in entries]
    if not any(d in e.path.parents for e in entries for d in home.checkpoint_dirs()):
        checks.append(Check("models", OK, f"no checkpoints of your own yet (add them to {home.checkpoints});"
                            " the built-in starter is used"))
    checks.append(_check_default_model(settings, library))
    checks.append(_check_downloads(checks))
    checks.append(_check_last_proof(home))
    return checks


def readiness(home: Home, *, device: str | None = None, precision: str | None = None, deep: bool = False) -> dict:
    checks = readiness_checks(home, deep=deep)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    return {"environment": environment(home, device=device, precision=precision),
            "checks": [asdict(c) for c in checks], "counts": counts, "ok": counts[FAIL] == 0}


def render_readiness(report: dict) -> str:
    env = report["environment"]
    attempts = env["blocked_attempts"]
    lines = [
        f"Darkroom {env['darkroom']} on Python {env['python']} ({env['platform']})",
        f"Device: {env['device']} at {env['precision']} ({env['device_reason']})",
        f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}",
        f"Home: {env['home']}",
        "Model folders: " + ", ".join(f["path"] + ("" if f["exists"] else " (missing)") for f in env["model_folders"]),
        "Offline switches: " + ", ".join(f"{k}={v}" for k, v in env["offline_switches"].items()
                                         if k.endswith("OFFLINE") or k == "DO_NOT_TRACK"),
        f"Network guard: {'installed' if env['guard_installed'] else 'NOT installed'}; log {env['network_log']}",
    ]
    if attempts:
        lines.append(f"Blocked outbound connection attempts: {len(attempts)}")
        lines += [f"  {a['when']}  {a['host']}:{a['port']}  from {a['caller']}" for a in attempts[-20:]]
    else:
        lines.append("Blocked outbound connection attempts: none (all is well)")
    lines.append("")
    lines.append("Offline readiness:")
    width = max(len(c["name"]) for c in report["checks"])
    lines += [f"  {c['status']:<4}  {c['name']:<{width}}  {c['reason']}" for c in report["checks"]]
    n = report["counts"]
    lines.append(f"{n[OK]} OK, {n[WARN]} WARN, {n[FAIL]} FAIL"
                 + ("" if report["ok"] else ": fix the FAIL lines before going offline"))
    return "\n".join(lines)


