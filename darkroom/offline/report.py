"""`darkroom doctor --report FILE`: a diagnostics file to carry to a connected machine.

It holds what someone helping needs (versions, device, settings, the models' names, sizes and
families, the readiness checks, the end of logs/darkroom.log, the network guard's record) and
leaves out what is personal: the home folder becomes ~, the user name <user>, the Darkroom home
<darkroom-home>, path-valued settings <path>, and prompts are removed from the log (generation
parameters and prompt fields). The file starts with a note saying so.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from darkroom.home import Home
from darkroom.offline import guard as offline

LOG_LINES = 200
"""How many of the log's last lines the report holds."""

_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")  # logging's asctime: a new record
_INFOTEXT = re.compile(r"(?:^|\n)\s*Negative prompt:|\bSteps: \d+, .*\b(?:Sampler|Seed|CFG scale): ", re.S)
_PROMPT_FIELD = re.compile(r"""(\b\w*prompts?\w*['"]?\s*[:=]\s*)(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")""")
_HEADER = re.compile(r"^(\S+ \S+ \S+ [\w.]+: )")  # "2024-01-01 12:00:00,000 ERROR darkroom.jobs: "


class Redactor:
    """Takes the personal parts out of text: folders, the user name, prompts."""

    def __init__(self, *, user_home: str | None = None, user: str | None = None, darkroom_home: str | None = None):
        self.user_home = _clean(user_home if user_home is not None else str(Path.home()))
        self.user = user if user is not None else _user()
        self.darkroom_home = _clean(darkroom_home)
        self.counts = {"paths": 0, "user name": 0, "prompts": 0}

    def text(self, text: str) -> str:
        """Folders and the user name replaced (the Darkroom home first: it is often inside the user's)."""
        for folder, mark in ((self.darkroom_home, "<darkroom-home>"), (self.user_home, "~")):
            if folder and folder not in ("/", "~"):
                text, n = re.subn(re.escape(folder) + r"(?![\w.-])", lambda _, m=mark: m, text)
                self.counts["paths"] += n
        if self.user and len(self.user) > 1:
            text, n = re.subn(rf"(?<![\w]){re.escape(self.user)}(?![\w])", "<user>", text)
            self.counts["user name"] += n
        return text

    def log_lines(self, lines: list[str]) -> list[str]:
        """Log lines with prompts removed (a record with generation parameters loses its message) and
        the folders and user name replaced."""
        out: list[str] = []
        for record in _records(lines):
            joined = "\n".join(record)
            if _INFOTEXT.search(joined):
                head = _HEADER.match(record[0])
                out.append((head.group(1) if head else "") + f"[{len(record)} line(s) with a prompt removed]")
                self.counts["prompts"] += 1
                continue
            for line in record:
                line, n = _PROMPT_FIELD.subn(r"\1'<prompt removed>'", line)
                self.counts["prompts"] += n
                out.append(self.text(line))
        return out

    def value(self, value):
        """A setting's value: a string that names a file or folder becomes <path>; containers recursively."""
        if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
            self.counts["paths"] += 1
            return "<path>"
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value


def _clean(folder: str | None) -> str | None:
    return folder.rstrip("/\\") or None if folder else None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return None


def _records(lines: list[str]) -> list[list[str]]:
    """Lines grouped into log records (a traceback or a multi-line message continues its record)."""
    records: list[list[str]] = []
    for line in lines:
        if _RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    return records


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 512 * 1024))  # the end is enough: a log may be big
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


def _models(home: Home) -> list[dict]:
    from darkroom.models.library import ModelLibrary

    out = []
    for e in ModelLibrary(home).scan():
        d = e.detection
        out.append({"name": e.name, "size": e.size, "format": "diffusers" if e.is_diffusers else e.path.suffix,
                    "kind": d.kind if d else None, "family": d.label if d and d.kind == "checkpoint" else
                    (d.detail if d else None), "error": e.error})
    return out


def build_report(home: Home, ready: dict, *, redactor: Redactor | None = None, log_lines: int = LOG_LINES) -> dict:
    """The diagnostics as data, everything personal taken out (`ready`: readiness.readiness()'s answer)."""
    from darkroom.settings import Settings

    r = redactor or Redactor(darkroom_home=str(home.root))
    env = ready["environment"]
    versions = {k: env[k] for k in ("darkroom", "python", "platform", "torch", "diffusers", "transformers")}
    device = {k: env[k] for k in ("device", "precision", "device_reason")}
    settings = Settings(home.root / "settings.json")
    report = {
        "versions": versions,
        "device": {k: r.text(str(v)) for k, v in device.items()},
        "settings": {k: r.value(v) for k, v in settings.as_dict().items()},
        "models": [{k: r.text(v) if isinstance(v, str) else v for k, v in m.items()} for m in _models(home)],
        "checks": [{"status": c["status"], "name": r.text(c["name"]), "reason": r.text(c["reason"])}
                   for c in ready["checks"]],
        "guard": {"installed": env["guard_installed"],
                  "attempts": [{k: r.text(str(v)) if isinstance(v, str) else v for k, v in asdict(a).items()}
                               for a in offline.read_log(home.network_log)]},
        "log": r.log_lines(_tail(home.logs / "darkroom.log", log_lines)),
    }
    done = [f"{n} {what}" for what, n in r.counts.items() if n]
    report = {"about": {
        "what": "Darkroom diagnostics from `darkroom doctor --report`: versions, device, settings, models (names,"
                " sizes, families), the readiness checks, the last lines of logs/darkroom.log and the network"
                " guard's record.",
        "redacted": "Your home folder is written ~, your user name <user>, the Darkroom home <darkroom-home>,"
                    " settings that name files or folders <path>; model paths are left out and log records with"
                    " prompts or generation parameters are removed. Read the file before you share it.",
        "replaced": ", ".join(done) or "nothing",
    }, **report}
    return report


def render_report(report: dict) -> str:
    """The report as text: the note first, then a section per part."""
    about = report["about"]
    lines = ["# Darkroom diagnostics", "", about["what"], about["redacted"], f"Replaced: {about['replaced']}.", ""]
    lines += ["## Versions"] + [f"{k}: {v}" for k, v in report["versions"].items()]
    lines += ["", "## Device"] + [f"{k}: {v}" for k, v in report["device"].items()]
    lines += ["", "## Settings"] + [f"{k}: {json.dumps(v)}" for k, v in report["settings"].items()]
    lines += ["", f"## Models ({len(report['models'])})"]
    lines += [f"{m['name']}: {m['family'] or m['kind'] or '?'}, {m['size']:,} bytes, {m['format']}"
              + (f"; error: {m['error']}" if m["error"] else "") for m in report["models"]] or ["none"]
    lines += ["", "## Readiness checks"] + [f"{c['status']:<4} {c['name']}: {c['reason']}" for c in report["checks"]]
    guard = report["guard"]
    lines += ["", "## Network guard", f"installed: {guard['installed']}",
              f"blocked attempts: {len(guard['attempts'])}"]
    lines += [f"  {a['when']}  {a['host']}:{a['port']}  from {a['caller']}" for a in guard["attempts"]]
    lines += ["", f"## Log (last {len(report['log'])} lines of logs/darkroom.log)", *report["log"]]
    return "\n".join(lines) + "\n"


def write_report(path: Path, report: dict) -> None:
    """JSON when the file name ends in .json, else text; a folder that cannot take it is a StorageError."""
    from darkroom.fsutil import writes_to

    text = json.dumps(report, indent=2) + "\n" if path.suffix.lower() == ".json" else render_report(report)
    with writes_to(path.parent, f"write the report {path}"):
        path.write_text(text, encoding="utf-8")
