"""Dynamic prompts: {a|b} variants and __name__ wildcards per image, seeded, with the webui's own syntax untouched."""

from __future__ import annotations

import pytest
import webuiapi
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.engine.generate import random_seed
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.metadata.infotext import parse_infotext, request_from_infotext
from darkroom.request import GenerationRequest
from darkroom.text.wildcards import PromptPlanner, has_syntax
from tests.server_util import live_server

COLORS = "red\nblue\n# a comment line\ngreen\nyellow\npurple\norange\n"


@pytest.fixture
def wild_home(tmp_path) -> Home:
    home = Home(tmp_path / "home").ensure()
    home.wildcards.mkdir()
    (home.wildcards / "color.txt").write_text(COLORS)
    (home.wildcards / "animals").mkdir()
    (home.wildcards / "animals" / "pet.txt").write_text("cat\ndog\n")
    (home.wildcards / "nested.txt").write_text("a __color__ hat\n")
    (home.wildcards / "broken.txt").write_text("__nowhere__\n")
    return home


def plan(home: Home, prompt: str, negative: str = "", **kw):
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, **{"seed": 10, **kw})
    return PromptPlanner(home).plan(req, max_images=100, random_seed=random_seed)


def test_only_text_with_the_syntax_is_touched():
    assert has_syntax("a {b|c}") and has_syntax("a __color__ b") and has_syntax("${x=a}")
    for plain in ("a cat # not a comment", "^__^ smile", "snake_case", "[a|b]", "(x:1.2)", ""):
        assert not has_syntax(plain), plain


@pytest.mark.parametrize("webui", [
    "[cat:dog:0.5]", "[cat:dog:5]", "[a:[b:c:5]:3]", "[cat|dog|bird]", "(word:1.2)", "((strong)), [weak]",
    "<lora:my_lora:0.8>", "<lora:name:0.8:0.5>", "a cat :1.2 AND a dog :0.8", "a, BREAK, b", r"\(escaped\)",
    "embedding:1.2",
])
def test_the_webuis_own_syntax_passes_through(wild_home, webui):
    p = plan(wild_home, f"{webui} {{red|blue}} and {webui}", batch_size=4)
    assert {t.replace("red", "X").replace("blue", "X") for t in p.prompts} == {f"{webui} X and {webui}"}


def test_random_prompts_are_seeded_by_each_images_seed(wild_home):
    template = "a {big|small|tiny} __animals/pet__ in __color__"
    first = plan(wild_home, template, batch_size=3, n_iter=2)
    assert first.prompts == plan(wild_home, template, batch_size=3, n_iter=2).prompts  # same request, same prompts
    assert len(set(first.prompts)) > 1 and len(first.prompts) == 6
    for k, prompt in enumerate(first.prompts):  # image k's prompt is what a single image with seed + k draws
        assert plan(wild_home, template, seed=10 + k).prompts == [prompt]
    assert not any("comment" in p or "__" in p for p in first.prompts)
    assert plan(wild_home, "__nested__").prompts[0].startswith("a ")  # wildcards inside wildcard files
    assert plan(wild_home, "a {big|small}", dynamic_prompts=False, batch_size=2).prompts == ["a {big|small}"] * 2
    # with a variation seed every image keeps image 0's prompt, as the extension freezes it
    frozen = plan(wild_home, template, batch_size=4, subseed_strength=0.3)
    assert len(set(frozen.prompts)) == 1 and frozen.request.subseed != -1
    assert plan(wild_home, template, seed=-1).request.seed != -1  # a random seed is fixed so it can be recorded


def test_weights_ranges_and_negative_prompts(wild_home):
    weighted = plan(wild_home, "{0.01::rare|100::common}", batch_size=40).prompts
    assert weighted.count("common") >= 38
    two = plan(wild_home, "{2$$a|b|c}", batch_size=5).prompts
    assert all(len(set(p.split(","))) == 2 for p in two)
    assert all(set(p.split(" and ")) <= {"a", "b", "c"} and " and " in p
               for p in plan(wild_home, "{2$$ and $$a|b|c}", batch_size=3).prompts)
    p = plan(wild_home, "a cat", "{ugly|blurry}", batch_size=8)
    assert set(p.prompts) == {"a cat"} and set(p.negatives) == {"ugly", "blurry"}


def test_combinatorial_makes_one_image_per_combination(wild_home):
    p = plan(wild_home, "a {red|blue} {cat|dog|bird}", "{ugly|}", combinatorial=True, batch_size=4)
    assert len(p.prompts) == 12 and len(set(zip(p.prompts, p.negatives, strict=True))) == 12
    assert p.prompts[:3] == ["a red cat"] * 2 + ["a red dog"] and p.negatives[:2] == ["ugly", ""]
    assert p.request.n_iter == 3 and not p.uniform
    chunks = p.chunks()
    assert [c.request.seed for c in chunks] == [10 + c.first for c in chunks]
    assert sum(c.count for c in chunks) == 12 and all(c.request.batch_size == c.count for c in chunks)
    with pytest.raises(InvalidRequest, match="more than 3 combinations"):
        PromptPlanner(wild_home).plan(GenerationRequest(prompt="{a|b} {c|d}", combinatorial=True), max_images=3,
                                      random_seed=random_seed)


def test_clear_errors(wild_home):
    planner = PromptPlanner(wild_home)
    with pytest.raises(InvalidRequest, match=r"no wildcard file for __missing__: put missing.txt .* in .*wildcards;"
                                             r" the wildcards there are: animals/pet, broken, color, nested"):
        planner.check(GenerationRequest(prompt="a {x|__missing__}"))  # found before anything runs, in any branch
    with pytest.raises(InvalidRequest, match="no wildcard file for __nowhere__"):  # named inside a file
        plan(wild_home, "__broken__")
    with pytest.raises(InvalidRequest, match="does not parse at character 3 .*dynamic_prompts false"):
        planner.check(GenerationRequest(prompt="a {b|c"))
    (wild_home.wildcards / "loop.txt").write_text("again __loop__\n")
    with pytest.raises(InvalidRequest, match="refer to each other in a loop"):
        plan(wild_home, "__loop__")


def test_an_a1111_installs_wildcards_are_used_in_place(tmp_path):
    install = tmp_path / "webui"
    folder = install / "extensions" / "sd-dynamic-prompts" / "wildcards"
    folder.mkdir(parents=True)
    (folder / "season.txt").write_text("winter\n")
    home = Home(tmp_path / "home", extra_model_dirs=[install]).ensure()
    assert home.wildcard_dirs() == [home.wildcards, folder]
    assert plan(home, "in __season__").prompts == ["in winter"]


def test_engine_batch_of_different_prompts_equals_single_runs(wild_home, engine_factory, tiny_model):
    engine = engine_factory(wild_home)
    base = dict(steps=2, width=64, height=64, sampler="Euler", model=str(tiny_model("sd1")["path"]))
    result = engine.generate(GenerationRequest(prompt="a {cat|dog|bird|fish} in __color__", seed=20, batch_size=3,
                                               **base))
    prompts = [parse_infotext(im.infotext)["Prompt"] for im in result.images]
    assert result.seeds == [20, 21, 22] and len(set(prompts)) > 1 and not any("{" in p for p in prompts)
    assert result.request.prompt == "a {cat|dog|bird|fish} in __color__" and result.request.batch_size == 3
    for k, image in enumerate(result.images):
        single = engine.generate(GenerationRequest(prompt=prompts[k], seed=20 + k, **base))
        assert single.images[0].png == image.png, k
        # the infotext holds the expanded prompt, so rerunning the image reproduces it
        rerun = engine.generate(request_from_infotext(image.infotext).model_copy(update={"model": base["model"]}))
        assert rerun.images[0].png == image.png, k
    combos = engine.generate(GenerationRequest(prompt="{a|b|c}", seed=5, batch_size=2, combinatorial=True, **base))
    assert [parse_infotext(im.infotext)["Prompt"] for im in combos.images] == ["a", "b", "c"]
    assert combos.seeds == [5, 6, 7] and combos.request.n_iter == 2


def test_a1111_api_and_queue(wild_home, tiny_model):
    from tests.server_util import client, studio_with

    studio = studio_with(wild_home, tiny_model("sd1")["path"])
    try:
        with client(studio) as api:
            r = api.post("/sdapi/v1/txt2img", json={"prompt": "a __nope__", "steps": 1, "width": 64, "height": 64})
            assert r.status_code == 422 and "no wildcard file for __nope__" in r.json()["error"]
            assert studio.queue.jobs() == []  # refused at submission, nothing queued
            assert api.get("/api/wildcards").json()["names"] == ["animals/pet", "broken", "color", "nested"]
        with live_server(studio) as url:
            host, port = url.removeprefix("http://").split(":")
            webui = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=1)
            result = webui.txt2img(prompt="a __animals/pet__ in {red|blue|green|gold}", seed=8, batch_size=4,
                                   width=64, height=64)
            prompts = result.info["all_prompts"]
            assert len(prompts) == 4 and len(set(prompts)) > 1 and all(p.startswith("a ") for p in prompts)
            assert prompts == [parse_infotext(t)["Prompt"] for t in result.info["infotexts"]]
    finally:
        studio.close()


def test_cli_flags(wild_home, tiny_model, tmp_path):
    def run(*args):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        r = CliRunner().invoke(cli, ["--home", str(wild_home.root), "generate", *args, "--model",
                                     str(tiny_model("sd1")["path"]), "--steps", "1", "-W", "64", "-H", "64",
                                     "--seed", "3", "-o", str(out), "--precision", "fp32"])
        assert r.exit_code == 0, r.output
        return [parse_infotext(Image.open(p).info["parameters"])["Prompt"] for p in sorted(out.glob("*.png"))]

    assert run("{x|y}", "--combinatorial") == ["x", "y"]
    assert run("{x|y}", "--no-dynamic-prompts") == ["{x|y}"]
    assert run("__color__")[0] in COLORS.split("\n")
    r = CliRunner().invoke(cli, ["--home", str(wild_home.root), "generate", "__gone__"])
    assert r.exit_code != 0 and "no wildcard file for __gone__" in r.output and "Traceback" not in r.output
