"""`darkroom doctor --report FILE`: a diagnostics file with versions and model families, nothing personal."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from darkroom.cli.doctor import doctor
from darkroom.cli.group import Context
from darkroom.home import Home
from darkroom.offline import readiness
from darkroom.offline.report import Redactor, build_report, render_report

USER = "alicewonder"
PROMPT = "a portrait of my neighbour Jane at 12 Elm Street"


def _personal_home(tmp_path, tiny_model) -> tuple[Home, str]:
    """A Darkroom home inside a user's home, with a model, a settings path and a log holding a prompt."""
    user_home = tmp_path / "home" / USER
    home = Home(user_home / "darkroom").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "my-model.safetensors")
    elsewhere = user_home / "sd-webui" / "models"
    elsewhere.mkdir(parents=True)
    home.logs.mkdir(parents=True, exist_ok=True)
    (home.root / "settings.json").write_text(json.dumps({"models_dirs": [str(elsewhere)], "clip_skip": 2}))
    (home.logs / "darkroom.log").write_text(
        "2025-01-02 10:00:00,000 INFO darkroom: generated 1 image(s) into "
        f"{home.root}/outputs/txt2img/2025-01-02\n"
        f"2025-01-02 10:01:00,000 WARNING darkroom.jobs: job 7 failed: {PROMPT}\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: my-model\n"
        f"2025-01-02 10:02:00,000 ERROR darkroom.server: request {{'prompt': '{PROMPT}', 'steps': 20}}\n"
        f"2025-01-02 10:03:00,000 ERROR darkroom: cannot read /mnt/usb/{USER}/x.png: no such file\n",
        encoding="utf-8")
    return home, str(user_home)


def test_report_redacts_folders_user_and_prompts(tmp_path, tiny_model):
    home, user_home = _personal_home(tmp_path, tiny_model)
    ready = readiness.readiness(home, device="cpu")
    report = build_report(home, ready, redactor=Redactor(user_home=user_home, user=USER,
                                                           darkroom_home=str(home.root)))
    text = render_report(report)
    for secret in (user_home, USER, PROMPT, "Jane", "blurry", str(tmp_path)):
        assert secret not in text, secret
        assert secret not in json.dumps(report), secret
    assert text.startswith("# Darkroom diagnostics\n") and "Read the file before you share it" in text
    assert report["versions"]["darkroom"] and report["versions"]["torch"] and report["versions"]["python"]
    assert ("my-model", "SD1") in [(m["name"], m["family"]) for m in report["models"]]
    assert report["settings"]["models_dirs"] == ["<path>"] and report["settings"]["clip_skip"] == 2
    assert "generated 1 image(s) into <darkroom-home>/outputs/txt2img/2025-01-02" in text
    assert "cannot read /mnt/usb/<user>/x.png" in text
    assert "[3 line(s) with a prompt removed]" in text and "'prompt': '<prompt removed>'" in text
    assert report["guard"]["installed"] in (True, False) and report["guard"]["attempts"] == []


def test_doctor_report_command_writes_the_file(tmp_path, tiny_model, monkeypatch):
    home, user_home = _personal_home(tmp_path, tiny_model)
    monkeypatch.setenv("HOME", user_home)
    monkeypatch.setenv("USER", USER)
    monkeypatch.setenv("LOGNAME", USER)
    out = tmp_path / "report.json"
    r = CliRunner().invoke(doctor, ["--device", "cpu", "--report", str(out)], obj=Context(home),
                           catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output
    assert f"Diagnostics written to {out}" in r.stderr
    data = out.read_text(encoding="utf-8")
    for secret in (user_home, USER, PROMPT):
        assert secret not in data, secret
    report = json.loads(data)
    assert list(report)[0] == "about" and "prompts" in report["about"]["redacted"]
    assert ("my-model", "SD1") in [(m["name"], m["family"]) for m in report["models"]]
    assert report["versions"]["diffusers"]
    assert report["device"]["device"] == "cpu"


def test_doctor_report_to_a_folder_that_cannot_take_it(tmp_path, home):
    r = CliRunner().invoke(doctor, ["--report", str(tmp_path / "missing" / "r.txt")], obj=Context(home))
    last = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 1 and last.startswith("error: cannot write the report ") and "[DR-STORAGE" in last
