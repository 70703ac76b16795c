"""Model cards (NAME.json of the webui, NAME.civitai.info of Civitai Helper): read, shown, and carried
wherever models travel (import, `models export`, bundles, backups)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from darkroom.carry import backup as bk
from darkroom.carry import bundle
from darkroom.cli import cli
from darkroom.home import Home
from darkroom.models import cards
from darkroom.models.cards import MAX_CARD_BYTES, read_card, sidecars_of
from darkroom.testing.tiny_lora import write_tiny_lora

# what the webui's "Edit metadata" dialog of a LoRA writes (extensions-builtin/Lora/ui_edit_user_metadata.py)
WEBUI = {"description": "Ink wash style", "sd version": "SD1", "activation text": "inkwash style, monochrome",
         "preferred weight": 0.7, "negative text": "color", "notes": "best at 512 px"}
# a Civitai model version as Civitai Helper saves it
CIVITAI = {"id": 12345, "modelId": 678, "name": "v2.0", "trainedWords": ["inkdrawing", " sumi-e ", 3],
           "baseModel": "SD 1.5", "description": "<p>Trained on <b>ink</b> paintings &amp; scrolls.</p><p>Enjoy</p>",
           "model": {"name": "Ink Wash", "type": "LORA", "nsfw": False},
           "images": [{"url": "https://image.civitai.com/x.jpeg", "width": 512, "height": 768}] * 40}
SECRET = b'{"activation text": "SECRET-KEY-MATERIAL"}'


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _with_cards(model: Path, webui: dict | None = WEBUI, civitai: dict | None = CIVITAI) -> Path:
    stem = model.name.removesuffix(".safetensors")
    if webui is not None:
        model.with_name(stem + ".json").write_text(json.dumps(webui, indent=4), encoding="utf-8")
    if civitai is not None:
        model.with_name(stem + ".civitai.info").write_text(json.dumps(civitai), encoding="utf-8")
    model.with_name(stem + ".preview.png").write_bytes(b"\x89PNG\r\n\x1a\npreview")
    return model


@pytest.fixture
def outside(tmp_path) -> Path:
    """A private folder elsewhere on the machine."""
    d = tmp_path / "private"
    d.mkdir()
    (d / "secret.json").write_bytes(SECRET)
    return d


@pytest.fixture
def lora(tmp_path, tiny_model) -> Path:
    """A tiny LoRA on a "USB drive" with both cards and a preview beside it."""
    path = tmp_path / "usb" / "ink.safetensors"
    write_tiny_lora(path, tiny_model("sd1"), rank=2)
    return _with_cards(path)


def _cli(home: Home, *args):
    return CliRunner().invoke(cli, ["--home", str(home.root), "models", *args], catch_exceptions=False)


# --- reading --------------------------------------------------------------------------------


def test_webui_user_metadata_is_read(tmp_path):
    model = _with_cards(tmp_path / "m.safetensors", civitai=None)
    card = read_card(model)
    assert (card.description, card.activation_text, card.negative_text, card.notes) == (
        "Ink wash style", "inkwash style, monochrome", "color", "best at 512 px")
    assert card.preferred_weight == 0.7 and card.base_model == "SD1" and card.title is None
    assert [p.name for p in card.sources] == ["m.json"] and card.problems == []


def test_civitai_info_is_read_as_plain_text(tmp_path):
    card = read_card(_with_cards(tmp_path / "m.safetensors", webui=None))
    assert card.title == "Ink Wash (v2.0)"
    assert card.activation_text == "inkdrawing, sumi-e"  # words trimmed, a non-string skipped
    assert card.description == "Trained on ink paintings & scrolls.\nEnjoy"
    assert card.base_model == "SD 1.5" and card.preferred_weight is None


def test_the_users_own_metadata_wins_over_civitais(tmp_path):
    card = read_card(_with_cards(tmp_path / "m.safetensors"))
    assert card.activation_text == "inkwash style, monochrome" and card.description == "Ink wash style"
    assert card.title == "Ink Wash (v2.0)" and card.base_model == "SD1"
    assert [p.name for p in card.sources] == ["m.civitai.info", "m.json"]
    # the webui writes 0 for "no preferred weight", "Unknown" for no version, "" for no description
    _with_cards(tmp_path / "m.safetensors", webui={"preferred weight": 0.0, "sd version": "Unknown",
                                                    "description": "", "activation text": ["not", "text"]})
    card = read_card(tmp_path / "m.safetensors")
    assert card.preferred_weight is None and card.base_model == "SD 1.5"
    assert card.description.startswith("Trained on") and card.activation_text == "inkdrawing, sumi-e"


def test_no_sidecars_is_an_empty_card(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    card = read_card(tmp_path / "m.safetensors")
    assert card.empty and card.sources == [] and card.problems == []


@pytest.mark.parametrize(("content", "why"), [
    (b'{"activation text": "x",', "not valid JSON (line 1"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"notes": "' + b"a" * MAX_CARD_BYTES + b'"}', "larger than 2 MiB"),
])
def test_malformed_and_oversized_sidecars_are_ignored_with_a_note(tmp_path, content, why):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    (tmp_path / "m.json").write_bytes(content)
    card = read_card(model)
    assert card.empty and card.sources == []
    assert len(card.problems) == 1 and card.problems[0].startswith(f"m.json: {why}"), card.problems
    assert card.problems[0].endswith("ignored")


def test_a_sidecar_linking_out_of_its_folder_is_not_followed(tmp_path, outside):
    lib = tmp_path / "lib"
    lib.mkdir()
    model = lib / "m.safetensors"
    model.write_bytes(b"x")
    (lib / "m.json").symlink_to(outside / "secret.json")
    (lib / "m.preview.png").symlink_to(outside / "secret.json")
    os.mkfifo(lib / "m.civitai.info")  # a FIFO would hang a plain read: it is no card at all
    card = read_card(model)
    assert card.activation_text is None and card.sources == []
    assert card.problems == [f"m.json: a link to a file outside {lib}; not followed"]
    assert sidecars_of(model) == []
    # a link to a file inside the same folder is the user's own arrangement: followed
    (lib / "shared.json").write_text(json.dumps(WEBUI))
    (lib / "m.json").unlink()
    (lib / "m.json").symlink_to("shared.json")
    assert read_card(model).activation_text == "inkwash style, monochrome"
    assert [p.name for p in sidecars_of(model)] == ["m.json"]


def test_sidecars_of_lists_previews_yaml_and_cards(tmp_path):
    model = _with_cards(tmp_path / "x.vae.safetensors")
    (tmp_path / "x.vae.yaml").write_text("model: {}")
    (tmp_path / "x.vae.txt").write_text("not carried")
    (tmp_path / "other.json").write_text("{}")
    assert [p.name for p in sidecars_of(model)] == ["x.vae.preview.png", "x.vae.yaml", "x.vae.civitai.info",
                                                    "x.vae.json"]
    assert cards.model_stem(model) == "x.vae"


# --- shown ----------------------------------------------------------------------------------


def test_models_info_shows_the_card(home, lora):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    r = _cli(home, "info", "ink")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.split() == ["card", "ink.civitai.info,", "ink.json"] for line in lines), r.stdout
    assert any(line.startswith("activation text") and line.endswith("  inkwash style, monochrome") for line in lines)
    assert any(line.startswith("preferred weight") and line.endswith("  0.7") for line in lines)
    assert any(line.startswith("title") and line.endswith("  Ink Wash (v2.0)") for line in lines)
    data = json.loads(_cli(home, "info", "ink", "--json").stdout)
    assert data["card"]["activation_text"] == "inkwash style, monochrome"
    assert data["card"]["sources"] == ["ink.civitai.info", "ink.json"]
    (home.loras / "ink.json").write_text("{broken")
    r = _cli(home, "info", "ink")
    assert r.exit_code == 0 and "note: ink.json: not valid JSON" in r.stderr
    assert "activation text  inkdrawing, sumi-e" in r.stdout  # the civitai.info still counts


def test_native_api_rows_carry_the_card(home, lora, tiny_model):
    from tests.server_util import client, studio_with

    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    write_tiny_lora(home.loras / "plain.safetensors", tiny_model("sd1"), rank=2, seed=3)
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "dream.safetensors")
    (home.checkpoints / "dream.civitai.info").write_text(json.dumps({**CIVITAI, "trainedWords": []}))
    studio = studio_with(home, start=False)
    try:
        with client(studio) as api:
            loras = {row["name"]: row for row in api.get("/api/loras").json()}
            models = {row["name"]: row for row in api.get("/api/models").json()}
    finally:
        studio.close()
    card = loras["ink"]["card"]
    assert card["activation_text"] == "inkwash style, monochrome" and card["preferred_weight"] == 0.7
    assert card["title"] == "Ink Wash (v2.0)" and card["sources"] == ["ink.civitai.info", "ink.json"]
    assert loras["plain"]["card"] is None
    assert models["dream"]["card"]["title"] == "Ink Wash (v2.0)"
    assert models["dream"]["card"]["activation_text"] is None


def test_the_lora_picker_inserts_preferred_weight_and_activation_text():
    """As the webui's extra networks page does: `<lora:NAME:WEIGHT>` then the activation text."""
    js = (Path(bundle.__file__).parents[1] / "server" / "static" / "extras.js").read_text()
    assert "const tag = `<lora:${l.name}:${mc.preferred_weight || 1}>`;" in js
    assert "const insert = mc.activation_text ? `${tag} ${mc.activation_text}` : tag;" in js
    assert "insertIntoPrompt(insert, ' ')" in js


# --- carried: import, export, bundles, backups ----------------------------------------------


def test_import_carries_cards_with_the_model(home, lora, outside):
    (lora.parent / "ink.yaml").symlink_to(outside / "secret.json")  # a link out: left behind
    r = _cli(home, "import", str(lora.parent))
    assert r.exit_code == 0, r.output
    for name in ("ink.json", "ink.civitai.info", "ink.preview.png"):
        assert (home.loras / name).read_bytes() == (lora.parent / name).read_bytes()
        assert f"  with {name}" in r.stdout
    assert not (home.loras / "ink.yaml").exists()
    assert read_card(home.loras / "ink.safetensors").activation_text == "inkwash style, monochrome"


def test_export_copies_models_with_their_cards_and_lists_them_in_sha256sums(home, lora, tmp_path, outside):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    (home.loras / "ink.yaml").symlink_to(outside / "secret.json")
    drive = tmp_path / "drive"
    r = _cli(home, "export", str(drive), "ink")
    assert r.exit_code == 0, r.output
    names = ["ink.safetensors", "ink.preview.png", "ink.civitai.info", "ink.json"]
    assert sorted(p.name for p in (drive / "loras").iterdir()) == sorted(names)  # no .yaml link, no .part
    sums = dict(reversed(line.split("  ", 1)) for line in (drive / "SHA256SUMS").read_text().splitlines())
    assert sums == {f"loras/{n}": _sha(home.loras / n) for n in names}
    assert b"SECRET" not in b"".join(p.read_bytes() for p in drive.rglob("*") if p.is_file())
    assert "exported lora ink ->" in r.stdout and "  with ink.json" in r.stdout

    again = _cli(home, "export", str(drive), "ink", "--json")  # nothing overwritten, the same bytes count
    assert again.exit_code == 0 and json.loads(again.stdout)[0]["status"] == "already there"

    other = Home(tmp_path / "other").ensure()  # the other machine
    r = _cli(other, "import", str(drive))
    assert r.exit_code == 0, r.output
    assert read_card(other.loras / "ink.safetensors").preferred_weight == 0.7
    assert "not in SHA256SUMS" not in r.stdout


def test_import_refuses_what_differs_from_the_export_sha256sums(home, lora, tmp_path):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    drive = tmp_path / "drive"
    assert _cli(home, "export", str(drive), "ink").exit_code == 0
    (drive / "loras" / "ink.json").write_text('{"activation text": "tampered"}')
    other = Home(tmp_path / "other").ensure()
    r = _cli(other, "import", str(drive))
    assert r.exit_code == 0, r.output  # the model is fine; its damaged card is left out, and said so
    assert "ink.json left out: its SHA-256" in r.stdout and not (other.loras / "ink.json").exists()
    assert (other.loras / "ink.civitai.info").is_file()

    data = bytearray((drive / "loras" / "ink.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a bit flipped on the way
    (drive / "loras" / "ink.safetensors").write_bytes(bytes(data))
    third = Home(tmp_path / "third").ensure()
    r = _cli(third, "import", str(drive))
    assert r.exit_code == 1
    assert "differs from the one in SHA256SUMS" in r.stderr and "damaged on the way" in r.stderr
    assert not list(third.loras.iterdir())
    r = _cli(third, "import", str(drive / "loras" / "ink.safetensors"))  # named alone: still checked
    assert r.exit_code == 1 and "differs from the one in SHA256SUMS" in r.stderr


def test_export_refuses_names_that_differ_only_in_case(home, lora, tmp_path, tiny_model):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    drive = tmp_path / "drive"
    (drive / "loras").mkdir(parents=True)
    write_tiny_lora(drive / "loras" / "Ink.safetensors", tiny_model("sd1"), rank=2, seed=9)
    r = _cli(home, "export", str(drive), "ink")
    assert r.exit_code != 0
    assert "loras/Ink.safetensors and loras/ink.safetensors differ only in letter case" in r.output
    assert sorted(p.name for p in (drive / "loras").iterdir()) == ["Ink.safetensors"]  # nothing copied
    assert not (drive / "SHA256SUMS").exists()


def test_export_never_overwrites_a_different_file(home, lora, tmp_path):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    drive = tmp_path / "drive"
    (drive / "loras").mkdir(parents=True)
    (drive / "loras" / "ink.safetensors").write_bytes(b"someone else's file")
    r = _cli(home, "export", str(drive), "ink")
    assert r.exit_code == 1 and "already exists and is a different file" in r.stderr
    assert (drive / "loras" / "ink.safetensors").read_bytes() == b"someone else's file"
    r = _cli(home, "export", str(drive), "nosuch")
    assert r.exit_code != 0 and "no model named 'nosuch'" in r.output


def test_bundles_carry_the_sidecars_of_their_models(home, lora, tmp_path, outside):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    (home.loras / "ink.yaml").symlink_to(outside / "secret.json")
    chosen, _ = bundle.resolve_models(home, ["ink"])
    out = tmp_path / "bundle"
    hashes = bundle.copy_models(chosen, out)
    names = ["ink.safetensors", "ink.preview.png", "ink.civitai.info", "ink.json"]
    assert hashes == {f"models/loras/{n}": _sha(home.loras / n) for n in names}
    assert sorted(p.name for p in (out / "models" / "loras").iterdir()) == sorted(names)
    assert bundle.model_bytes(chosen) == sum((home.loras / n).stat().st_size for n in names)


def test_backups_with_models_carry_the_cards(home, lora, tmp_path, outside):
    shutil.copytree(lora.parent, home.loras, dirs_exist_ok=True)
    (home.loras / "ink.yaml").symlink_to(outside / "secret.json")
    bk.backup_home(home, tmp_path / "bk", models=True)
    restored = Home(tmp_path / "restored")
    bk.restore_home(restored, tmp_path / "bk")
    for name in ("ink.json", "ink.civitai.info", "ink.preview.png"):
        assert (restored.loras / name).read_bytes() == (home.loras / name).read_bytes()
    assert not (restored.loras / "ink.yaml").exists()
