"""Prompt styles in the webui's styles.csv: read and written as the webui does, applied, listed everywhere."""

from __future__ import annotations

import io

import pytest
import webuiapi
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.metadata.infotext import parse_infotext, request_from_infotext
from darkroom.request import GenerationRequest
from darkroom.text.styles import Style, StyleLibrary, apply_styles, merge_prompts
from tests.server_util import live_server

WEBUI_FILE = ("\ufeffname,prompt,negative_prompt\r\n"
              'Film,"analog photo of {prompt}, film grain","blurry, lowres"\r\n'
              "Sharp,sharp focus,\r\n")


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def test_merging_is_the_webuis():
    assert merge_prompts("photo of {prompt}, 35mm", "a cat") == "photo of a cat, 35mm"
    assert merge_prompts("masterpiece", "a cat ") == "a cat, masterpiece"
    assert merge_prompts("masterpiece", "") == "masterpiece"  # no leading ", "
    assert merge_prompts("", "a cat") == "a cat"
    assert merge_prompts("{prompt}{prompt}", "x") == "xx"
    film, sharp = Style("Film", "photo of {prompt}", "blurry"), Style("Sharp", "sharp", "")
    assert apply_styles("a cat", "ugly", [film, sharp]) == ("photo of a cat, sharp", "ugly, blurry")
    a, b = Style("A", "a", "na"), Style("B", "b", "nb")
    assert apply_styles("x", "", [a, b]) == ("x, a, b", "na, nb")  # in the order given
    assert apply_styles("x", "", [b, a]) == ("x, b, a", "nb, na")
    assert apply_styles("a cat", "", [Style("P", "{prompt} X", "{prompt} neg")]) == ("a cat X", " neg")


def test_reading_every_webui_layout(tmp_path):
    install = tmp_path / "webui"  # an A1111/Forge root used in place
    (install / "models" / "Stable-diffusion").mkdir(parents=True)
    home = Home(tmp_path / "home", extra_model_dirs=[install]).ensure()
    write(home.styles_file, WEBUI_FILE)
    # the oldest layout (name, text), spaces after commas, a comment row and an empty row
    write(install / "styles.csv", 'name, text\n# notes,ignored\n\nOld, "old style, {prompt}"\nSharp,overridden\n')
    write(install / "styles_integrated.csv", "name,prompt,negative_prompt,description\nDesc,d,nd,a note\n")
    write(install / "not-styles.csv", "name,prompt\nNope,x\n")
    library = StyleLibrary(home)
    assert library.files() == [home.styles_file, install / "styles.csv", install / "styles_integrated.csv"]
    styles = library.styles()
    assert list(styles) == ["Film", "Sharp", "Old", "Desc"]
    assert styles["Film"] == Style("Film", "analog photo of {prompt}, film grain", "blurry, lowres")
    assert styles["Old"].prompt == "old style, {prompt}" and styles["Old"].negative_prompt == ""
    assert styles["Sharp"].prompt == "overridden" and styles["Sharp"].path == install / "styles.csv"  # later file wins
    assert styles["Desc"].description == "a note"
    assert library.apply("a cat", "", ["Old", "Film"]) == ("analog photo of old style, a cat, film grain",
                                                           "blurry, lowres")


def test_unknown_style_names_the_ones_there(home):
    write(home.styles_file, WEBUI_FILE)
    with pytest.raises(InvalidRequest, match=r"unknown style 'Flim'; the styles are: Film, Sharp \(from .*styles.csv"):
        StyleLibrary(home).apply("x", "", ["Flim"])
    with pytest.raises(InvalidRequest, match="no styles are defined"):
        StyleLibrary(Home(home.root / "empty")).resolve(["Film"])
    home.styles_file.write_bytes(b"name,prompt\n\xff\n")
    with pytest.raises(InvalidRequest, match="is not UTF-8"):
        StyleLibrary(home).styles()
    home.styles_file.write_text("prompt,negative_prompt\nx,y\n")
    with pytest.raises(InvalidRequest, match="no 'name' column"):
        StyleLibrary(home).styles()


def test_writing_keeps_other_rows_and_the_files_format(tmp_path):
    install = tmp_path / "webui"
    home = Home(tmp_path / "home", extra_model_dirs=[install]).ensure()
    # a hand-edited file: LF line ends, no BOM, a comment row, an extra column the webui does not know
    original = ("name,prompt,negative_prompt,rating\n# mine,,,\nKeep,\"a, b\",c,5\nChange,old,old neg,3\n")
    write(install / "styles.csv", original)
    library = StyleLibrary(home)
    assert library.save(Style("Change", 'new "quoted", {prompt}', "")) == install / "styles.csv"
    assert (install / "styles.csv").read_bytes().decode() == (
        "name,prompt,negative_prompt,rating\n# mine,,,\nKeep,\"a, b\",c,5\n"
        "Change,\"new \"\"quoted\"\", {prompt}\",,3\n")
    # a new style goes to the home's styles.csv, written as the webui writes one (BOM, CRLF)
    assert library.save(Style("New", "n", "nn", "why")) == home.styles_file
    assert home.styles_file.read_bytes() == "\ufeffname,prompt,negative_prompt,description\r\nNew,n,nn,why\r\n".encode()
    assert library.styles()["Change"].prompt == 'new "quoted", {prompt}'
    assert library.delete("Keep") == [install / "styles.csv"]
    assert "Keep" not in library.styles() and "# mine" in (install / "styles.csv").read_text()
    assert not list(install.glob(".*tmp")) and not list(home.root.glob(".*tmp"))  # written through a temp + rename
    with pytest.raises(InvalidRequest, match="unknown style 'Keep'"):
        library.delete("Keep")
    with pytest.raises(InvalidRequest, match="not empty and does not start with '#'"):
        library.save(Style("# x", "p"))


def test_engine_applies_styles_and_records_the_webuis_infotext(engine_factory, tmp_path, tiny_model):
    home = Home(tmp_path / "home").ensure()
    write(home.styles_file, WEBUI_FILE)
    engine = engine_factory(home)
    base = dict(steps=2, width=64, height=64, seed=3, sampler="Euler", model=str(tiny_model("sd1")["path"]))
    styled = engine.generate(GenerationRequest(prompt="a cat", negative_prompt="ugly", styles=["Film", "Sharp"],
                                               **base))
    params = parse_infotext(styled.images[0].infotext)
    # the webui records the prompt with the styles applied, and no style names
    assert params["Prompt"] == "analog photo of a cat, film grain, sharp focus"
    assert params["Negative prompt"] == "ugly, blurry, lowres"
    assert "Styles" not in styled.images[0].infotext
    assert styled.request.prompt == "a cat" and styled.request.styles == ["Film", "Sharp"]  # what was asked
    # the same text written out gives the same picture; rerunning the infotext needs no styles file
    plain = engine.generate(GenerationRequest(prompt=params["Prompt"], negative_prompt=params["Negative prompt"],
                                              **base))
    assert plain.images[0].png == styled.images[0].png
    pasted = request_from_infotext(styled.images[0].infotext)
    rerun = engine.generate(pasted.model_copy(update={"model": base["model"]}))
    assert rerun.images[0].png == styled.images[0].png
    with pytest.raises(InvalidRequest, match="unknown style 'Nope'"):
        engine.check_inputs(GenerationRequest(prompt="x", styles=["Nope"]))


def test_a1111_prompt_styles_and_styles_field_with_webuiapi(studio, api):
    write(studio.home.styles_file, WEBUI_FILE)
    assert api.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Film", "prompt": "analog photo of {prompt}, film grain", "negative_prompt": "blurry, lowres"},
        {"name": "Sharp", "prompt": "sharp focus", "negative_prompt": ""}]
    native = api.get("/api/styles").json()
    assert [s["name"] for s in native] == ["Film", "Sharp"] and native[0]["file"] == str(studio.home.styles_file)
    r = api.post("/api/jobs", json={"prompt": "x", "styles": ["Missing"], "steps": 1, "width": 64, "height": 64})
    assert r.status_code == 422 and "unknown style 'Missing'" in r.json()["error"]
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        assert [s["name"] for s in client.get_prompt_styles()] == ["Film", "Sharp"]
        result = client.txt2img(prompt="a dog", styles=["Film"], seed=4, width=64, height=64)
        assert result.info["all_prompts"] == ["analog photo of a dog, film grain"]
        assert parse_infotext(result.image.info["parameters"])["Negative prompt"] == "blurry, lowres"
        assert result.info["styles"] == ["Film"]


def test_cli_styles_and_generate_style(home, tiny_model, tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["--home", str(home.root), *args])

    r = run("styles", "add", "Film", "photo of {prompt}", "-N", "blurry")
    assert r.exit_code == 0 and str(home.styles_file) in r.output, r.output
    run("styles", "add", "Tmp", "x")
    assert run("styles", "delete", "Tmp").exit_code == 0
    r = run("styles")
    assert r.exit_code == 0 and "Film  (prompt: photo of {prompt}; negative: blurry)" in r.output
    assert "Tmp" not in r.output
    out = tmp_path / "out"
    r = run("generate", "a cat", "--style", "Film", "--model", str(tiny_model("sd1")["path"]), "--steps", "1",
            "-W", "64", "-H", "64", "-o", str(out), "--precision", "fp32")
    assert r.exit_code == 0, r.output
    [png] = out.glob("*.png")
    params = parse_infotext(Image.open(io.BytesIO(png.read_bytes())).info["parameters"])
    assert params["Prompt"] == "photo of a cat" and params["Negative prompt"] == "blurry"
    r = run("generate", "a cat", "--style", "Nope", "--model", str(tiny_model("sd1")["path"]))
    assert r.exit_code != 0 and "unknown style 'Nope'; the styles are: Film" in r.output
    assert "Traceback" not in r.output
