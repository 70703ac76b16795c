"""LoRA: prompt tags, the LoRA folders, key layouts, merging into tiny models and exact restoration."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from darkroom.engine.lora import (
    LoraFile,
    LoraLibrary,
    LoraModule,
    LoraUse,
    apply_loras,
    extract_lora_tags,
    lora_hashes_infotext,
    parse_lora_tensors,
)
from darkroom.errors import InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.request import GenerationRequest
from darkroom.testing.tiny_lora import write_tiny_lora

REQ = GenerationRequest(prompt="a red circle", steps=2, width=64, height=64, seed=1, sampler="Euler", cfg_scale=1.0)
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # a Linear in every tiny SD1 UNet
CONV3 = "down_blocks.0.resnets.0.conv1"  # a 3x3 Conv2d
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # a 1x1 Conv2d in SD1
Q_PROJ = "encoder.layers.0.self_attn.q_proj"


def module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """A module by path, in a text encoder with or without transformers' `text_model.` level."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule("text_model." + path)


def snapshot(model) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for i, slot in enumerate(model.text_encoders):
        out |= {f"te{i}.{k}": v.clone() for k, v in slot.model.state_dict().items()}
    return out


def assert_unchanged(model, saved: dict[str, torch.Tensor]) -> None:
    now = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    for i, slot in enumerate(model.text_encoders):
        now |= {f"te{i}.{k}": v for k, v in slot.model.state_dict().items()}
    assert now.keys() == saved.keys()
    changed = [k for k, v in now.items() if not torch.equal(v, saved[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_model, engine_factory):
    """An engine over a home holding the tiny SD1 model, that model, and the image without LoRA."""
    home = Home(tmp_path_factory.mktemp("lora-home")).ensure()
    info = tiny_model("sd1")
    shutil.copy(info["path"], home.checkpoints / "tiny-sd1.safetensors")
    engine = engine_factory(home)
    model = engine.load(REQ)

    def generate() -> bytes:
        assert engine.load(REQ) is model
        return engine.generate(REQ).images[0].png

    return SimpleNamespace(home=home, info=info, model=model, generate=generate, base=generate())


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    info = tiny_model("sdxl")
    return SimpleNamespace(info=info, model=load_checkpoint(info["path"], LoadOptions()))


# --------------------------------------------------------------------------- tags


def test_tags_are_extracted_and_removed():
    prompt, tags = extract_lora_tags("a cat <lora:pixel-art:0.8>, best <lyco:ink_wash> <LoRA:detail:0.5:0.25> end")
    assert prompt == "a cat , best   end"
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("pixel-art", 0.8, 0.8), ("ink_wash", 1.0, 1.0), ("detail", 0.5, 0.25)]
    assert tags[0].text == "<lora:pixel-art:0.8>"
    # named values as in the webui; dyn (dynamic rank) is accepted and ignored
    _, [tag] = extract_lora_tags("<lora:x:te=0.3:unet=-1.5:dyn=8>")
    assert (tag.te_weight, tag.unet_weight) == (0.3, -1.5)


def test_tags_none_duplicates_and_malformed():
    assert extract_lora_tags("a plain (prompt:1.2) <hypernet:foo:1>") == ("a plain (prompt:1.2) <hypernet:foo:1>", [])
    prompt, tags = extract_lora_tags("<lora:a:0.2> x <lora:b> y <lora:a:0.9>")
    assert prompt == " x  y "
    assert [(t.name, t.te_weight) for t in tags] == [("b", 1.0), ("a", 0.9)]  # the last one wins
    assert extract_lora_tags("keep <lora:> as text") == ("keep <lora:> as text", [])  # no tag for the webui either
    with pytest.raises(InvalidRequest, match="'strong' is not a number"):
        extract_lora_tags("<lora:style:strong>")
    with pytest.raises(InvalidRequest, match="no LoRA name"):
        extract_lora_tags("<lora: :0.5>")
    with pytest.raises(InvalidRequest, match="finite"):
        extract_lora_tags("<lora:style:nan>")


# --------------------------------------------------------------------------- generation


def test_kohya_lora_changes_the_image_in_both_namings_and_restores_exactly(sd1):
    saved = snapshot(sd1.model)
    merged = {}
    for naming in ("diffusers", "ldm"):
        written = write_tiny_lora(sd1.home.loras / f"style-{naming}.safetensors", sd1.info, naming=naming, alpha=2.0)
        assert any(k.startswith("lora_unet_input_blocks_") for k in written["tensors"]) == (naming == "ldm")
        lora = LoraFile(written["path"])
        with apply_loras(sd1.model, [(lora, 1.0)]) as applied:
            n = len(written["modules"])
            assert applied.layers[lora.name] == (n, n) and applied.changed == n
            merged[naming] = snapshot(sd1.model)
            if naming == "diffusers":
                assert sd1.generate() != sd1.base
        assert_unchanged(sd1.model, saved)  # every UNet and text-encoder tensor, bit for bit
    # the same layers under the two names kohya uses: the same merged model, so the same image
    assert all(torch.equal(v, merged["ldm"][k]) for k, v in merged["diffusers"].items())
    assert sum(not torch.equal(v, saved[k]) for k, v in merged["ldm"].items()) == n


def test_weight_zero_changes_nothing(sd1, monkeypatch):
    written = write_tiny_lora(sd1.home.loras / "zero.safetensors", sd1.info)
    lora = LoraFile(written["path"])
    saved = snapshot(sd1.model)

    def unread(self):
        raise AssertionError("a LoRA at weight 0 must not even be read")

    with monkeypatch.context() as m:
        m.setattr(LoraFile, "modules", unread)
        with apply_loras(sd1.model, [(lora, 0.0)]) as applied:
            assert applied.changed == 0
            assert_unchanged(sd1.model, saved)
            assert sd1.generate() == sd1.base
    # a zero text-encoder weight leaves the text encoder alone, the UNet weight still applies
    unet_layers = sum(1 for c, _ in written["modules"] if c == "unet")
    with apply_loras(sd1.model, [(lora, 0.0, 1.0)]) as applied:
        assert applied.changed == unet_layers
        te = sd1.model.text_encoders[0].model
        assert torch.equal(module(te, Q_PROJ).weight, saved[f"te0.{_te_key(te, Q_PROJ)}.weight"])
    assert_unchanged(sd1.model, saved)


def _te_key(te: torch.nn.Module, path: str) -> str:
    return path if any(k.startswith(path) for k in te.state_dict()) else "text_model." + path


def test_merged_weights_equal_the_math(sd1):
    """W' = W + weight * alpha / rank * up @ down; LoCon convolutions checked as composed convolutions."""
    written = write_tiny_lora(sd1.home.loras / "math.safetensors", sd1.info, rank=4, alpha=2.0, seed=3)
    tucker = write_tiny_lora(sd1.home.loras / "tucker.safetensors", sd1.info, rank=4, alpha=3.0, seed=4,
                             tucker=True, include_te=False)
    assert any(k.endswith(".lora_mid.weight") for k in tucker["tensors"])
    unet, te = sd1.model.unet, sd1.model.text_encoders[0].model
    before = {p: unet.get_submodule(p).weight.clone() for p in (TO_K, CONV3, PROJ_IN)}
    before_q = module(te, Q_PROJ).weight.clone()
    x = torch.randn(1, unet.get_submodule(CONV3).in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with apply_loras(sd1.model, [(LoraFile(written["path"]), 0.5, 0.8)]):
        m = written["modules"][("unet", TO_K)]
        expected = before[TO_K] + 0.8 * (2.0 / 4) * m["up"] @ m["down"]
        torch.testing.assert_close(unet.get_submodule(TO_K).weight, expected, rtol=0, atol=1e-6)
        q = written["modules"][("te1", Q_PROJ)]
        torch.testing.assert_close(module(te, Q_PROJ).weight, before_q + 0.5 * 0.5 * q["up"] @ q["down"],
                                   rtol=0, atol=1e-6)
        for path, padding in ((CONV3, 1), (PROJ_IN, 0)):  # 3x3 down + 1x1 up; 1x1 conv
            m = written["modules"][("unet", path)]
            delta = unet.get_submodule(path).weight - before[path]
            composed = F.conv2d(F.conv2d(x[:, : m["down"].shape[1]], m["down"], padding=padding), m["up"])
            got = F.conv2d(x[:, : m["down"].shape[1]], delta, padding=padding)
            torch.testing.assert_close(got, 0.8 * 0.5 * composed, rtol=1e-4, atol=1e-5)
    with apply_loras(sd1.model, [(LoraFile(tucker["path"]), 1.0)]):
        m = tucker["modules"][("unet", CONV3)]
        delta = unet.get_submodule(CONV3).weight - before[CONV3]
        composed = F.conv2d(F.conv2d(F.conv2d(x, m["down"]), m["mid"], padding=1), m["up"])
        torch.testing.assert_close(F.conv2d(x, delta, padding=1), 3.0 / 4 * composed, rtol=1e-4, atol=1e-5)


def test_two_loras_add_up(sd1):
    a = write_tiny_lora(sd1.home.loras / "a.safetensors", sd1.info, seed=11, rank=4, alpha=2.0)
    b = write_tiny_lora(sd1.home.loras / "b.safetensors", sd1.info, seed=12, rank=2, alpha=None, conv=False)
    weight = sd1.model.unet.get_submodule(TO_K).weight
    before = weight.clone()
    saved = snapshot(sd1.model)
    with apply_loras(sd1.model, [(LoraFile(a["path"]), 0.7), (LoraFile(b["path"]), -0.4)]) as applied:
        ma, mb = a["modules"][("unet", TO_K)], b["modules"][("unet", TO_K)]
        expected = before + 0.7 * 0.5 * ma["up"] @ ma["down"] - 0.4 * 1.0 * mb["up"] @ mb["down"]  # no alpha: 1
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
        assert applied.changed == len(a["modules"])  # b's layers are a subset of a's
    assert_unchanged(sd1.model, saved)


# --------------------------------------------------------------------------- formats


def _merged(model, lora: LoraFile, paths) -> dict:
    with apply_loras(model, [(lora, 0.9)]):
        return {(c, p): module(_root(model, c), p).weight.clone() for c, p in paths}


def _root(model, component: str) -> torch.nn.Module:
    return model.unet if component == "unet" else model.text_encoders[0 if component == "te1" else 1].model


def test_peft_file_merges_exactly_like_the_kohya_file(sd1):
    kohya = write_tiny_lora(sd1.home.loras / "k.safetensors", sd1.info, fmt="kohya", seed=5, alpha=2.0)
    peft = write_tiny_lora(sd1.home.loras / "p.safetensors", sd1.info, fmt="peft", seed=5, alpha=2.0)
    assert any(k.endswith(".lora_A.weight") and k.startswith("unet.") for k in peft["tensors"])
    assert any(k.startswith("text_encoder.text_model.") for k in peft["tensors"])
    paths = list(kohya["modules"])
    a = _merged(sd1.model, LoraFile(kohya["path"]), paths)
    b = _merged(sd1.model, LoraFile(peft["path"]), paths)
    assert all(torch.equal(a[p], b[p]) for p in paths)


def test_older_diffusers_layouts_parse_to_the_same_layers(sd1):
    """`.lora.down.weight`, attention processors (`attn1.processor.to_q_lora`) and the text
    encoder's `to_q_lora` / `lora_linear_layer` keys name the same layers as kohya's."""
    kohya = write_tiny_lora(sd1.home.loras / "k2.safetensors", sd1.info, seed=6, alpha=None, conv=False)
    peft = write_tiny_lora(sd1.home.loras / "p2.safetensors", sd1.info, fmt="peft", seed=6, alpha=None, conv=False)
    old = {}
    for key, value in peft["tensors"].items():
        role = "down" if ".lora_A." in key else "up"
        name = key.split(".lora_")[0]
        attn = name.rsplit(".", 1)[0] if ".attn" in name or "self_attn" in name else None
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("unet.") and ".attn" in name:  # very old: no unet. prefix
            base, proj = name.removeprefix("unet.").split(".attn")
            attn_n, proj = proj.split(".", 1)
            proj = "to_out" if proj == "to_out.0" else proj
            old[f"{base}.attn{attn_n}.processor.{proj}_lora.{role}.weight"] = value
        elif name.startswith("text_encoder.") and attn and attn.endswith("self_attn"):
            short = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[leaf]
            old[f"{attn}.{short}_lora.{role}.weight"] = value
        elif name.startswith("text_encoder."):
            old[f"{name}.lora_linear_layer.{role}.weight"] = value
        else:
            old[f"{name}.lora.{role}.weight"] = value
    assert any(".processor.to_out_lora." in k for k in old)

    def layers(mods: list[LoraModule]) -> dict:
        return {(m.component, m.lookup): (m.down, m.up, m.scale) for m in mods}

    want = layers(parse_lora_tensors(load_file(kohya["path"])))
    got = layers(parse_lora_tensors(old))
    assert got.keys() == want.keys()
    for k, (down, up, scale) in got.items():
        assert torch.equal(down, want[k][0]) and torch.equal(up, want[k][1]) and scale == want[k][2] == 1.0


def _diffusers_names(state_dict: dict, unet_config) -> dict[tuple[str, str], torch.Tensor]:
    """diffusers' own kohya conversion, reduced to (component, module path) -> down matrix."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state_dict, unet_config))
    out = {}
    for key, value in converted.items():
        if ".down." not in key:
            continue
        component, rest = key.split(".", 1)
        rest = rest.replace(".processor.", ".")
        for old, new in (("to_q_lora.down.weight", "to_q"), ("to_k_lora.down.weight", "to_k"),
                         ("to_v_lora.down.weight", "to_v"), ("to_out_lora.down.weight", "to_out.0"),
                         (".lora_linear_layer.down.weight", ""), (".lora.down.weight", "")):
            if rest.endswith(old):
                rest = rest[: -len(old)] + new
                break
        if component != "unet":
            rest = rest.removeprefix("text_model.").replace("self_attn.to_out.0", "self_attn.out_proj")
            for x in "qkv":
                rest = rest.replace(f"self_attn.to_{x}", f"self_attn.{x}_proj")
        out[(component, rest)] = value
    return out


@pytest.mark.parametrize("variant, naming", [("sd1", "diffusers"), ("sdxl", "ldm")])
def test_layer_names_agree_with_diffusers_conversion(request, tmp_path, variant, naming):
    target = request.getfixturevalue(variant)
    written = write_tiny_lora(tmp_path / "l.safetensors", target.info, naming=naming)
    lora = LoraFile(written["path"])
    theirs = _diffusers_names(load_file(written["path"]), target.model.unet.config)
    names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    ours = {}
    for layer, (component, path) in lora.targets(target.model).items():
        down = next(g.keys["down"] for g in lora.groups.values() if g.name == layer)
        ours[(names[component], path.removeprefix("text_model."))] = written["tensors"][down]
    assert len(ours) == len(written["modules"]) and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sdxl_te1_and_te2_go_to_their_encoders(sdxl, tmp_path):
    written = write_tiny_lora(tmp_path / "xl.safetensors", sdxl.info, include_unet=False, seed=8, alpha=2.0)
    prefixes = {k.split("text_model")[0] for k in written["tensors"]}
    assert prefixes == {"lora_te1_", "lora_te2_"}
    saved = snapshot(sdxl.model)
    with apply_loras(sdxl.model, [(LoraFile(written["path"]), 1.0)]) as applied:
        assert applied.changed == len(written["modules"])
        for (component, path), m in written["modules"].items():
            index = 0 if component == "te1" else 1
            weight = module(sdxl.model.text_encoders[index].model, path).weight
            key = f"te{index}.{_te_key(sdxl.model.text_encoders[index].model, path)}.weight"
            torch.testing.assert_close(weight, saved[key] + 0.5 * m["up"] @ m["down"], rtol=0, atol=1e-6)
        assert all(torch.equal(v, saved[f"unet.{k}"]) for k, v in sdxl.model.unet.state_dict().items())
    assert_unchanged(sdxl.model, saved)


# --------------------------------------------------------------------------- refusals


def test_lora_for_another_family_is_refused(sd1, sdxl, tmp_path):
    xl = write_tiny_lora(tmp_path / "pixel-xl.safetensors", sdxl.info, naming="ldm")
    saved = snapshot(sd1.model)
    with pytest.raises(InvalidRequest) as e:
        apply_loras(sd1.model, [LoraUse(LoraFile(xl["path"]), 1.0, name="pixel-art")])
    assert "LoRA 'pixel-art' is for SDXL but the model 'tiny-sd1' is SD1; pick an SDXL checkpoint" in str(e.value)
    assert_unchanged(sd1.model, saved)
    one = write_tiny_lora(tmp_path / "sd1.safetensors", sd1.info, conv=False)
    with pytest.raises(InvalidRequest, match=r"is for SD1/SD2 but the model 'tiny-sdxl' is SDXL"):
        apply_loras(sdxl.model, [(LoraFile(one["path"]), 1.0)])


def test_shapes_that_do_not_fit_are_refused_before_anything_changes(sd1, tmp_path):
    written = write_tiny_lora(tmp_path / "ok.safetensors", sd1.info)
    tensors = dict(written["tensors"])
    bad = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors[f"{bad}.lora_down.weight"] = torch.ones(4, 7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    saved = snapshot(sd1.model)
    with pytest.raises(InvalidRequest) as e:
        with apply_loras(sd1.model, [(LoraFile(tmp_path / "bad.safetensors"), 1.0)]):
            pytest.fail("must not get here")
    message = str(e.value)
    assert message.startswith("LoRA 'bad' does not fit the model 'tiny-sd1' (SD1)")
    assert f"its layer {bad} has down [4, 7], up [32, 4]" in message
    assert "to_k weight is [32, 32]; the LoRA was made for another model" in message
    assert message.endswith("(its cross-attention input is 7 wide)")
    assert_unchanged(sd1.model, saved)


def test_a_failure_while_merging_restores_what_was_merged(sd1, monkeypatch):
    lora = LoraFile(write_tiny_lora(sd1.home.loras / "boom.safetensors", sd1.info)["path"])
    applied = apply_loras(sd1.model, [(lora, 1.0)])
    saved = snapshot(sd1.model)
    calls = []
    real = LoraModule.delta

    def flaky(self, shape, device):
        calls.append(1)
        if len(calls) == 20:
            raise RuntimeError("out of memory")
        return real(self, shape, device)

    monkeypatch.setattr(LoraModule, "delta", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        with applied:
            pass
    assert len(calls) == 20
    assert_unchanged(sd1.model, saved)


def test_layers_missing_from_the_model(sd1, tmp_path):
    written = write_tiny_lora(tmp_path / "ok.safetensors", sd1.info, conv=False)
    names = sorted({k.split(".")[0] for k in written["tensors"] if k.startswith("lora_unet_")})

    def renamed(count: int) -> LoraFile:
        """The LoRA with `count` UNet layers renamed to layers no model has."""
        out = {}
        for key, value in written["tensors"].items():
            base, rest = key.split(".", 1)
            if base in names[:count]:
                base = base.replace("lora_unet_", "lora_unet_extra_")
            out[f"{base}.{rest}"] = value
        path = tmp_path / f"renamed-{count}.safetensors"
        save_file(out, str(path))
        return LoraFile(path)

    total = len(written["modules"])
    with apply_loras(sd1.model, [(renamed(1), 1.0)]) as applied:  # one stray layer: applied, logged
        assert applied.layers["renamed-1"] == (total - 1, total)
    with pytest.raises(InvalidRequest, match=r"does not fit: 12 of its \d+ layers .* do not exist in the model"):
        apply_loras(sd1.model, [(renamed(12), 1.0)])


def _write_keys(path: Path, shapes: dict[str, tuple], metadata: dict | None = None) -> LoraFile:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return LoraFile(path)


def test_base_model_from_real_widths_metadata_and_unsupported_types(sd1, tmp_path):
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (1280, "sdxl-refiner")):
        lora = _write_keys(tmp_path / f"w{width}.safetensors",
                           {f"{to_k}.lora_down.weight": (1, width), f"{to_k}.lora_up.weight": (640, 1)})
        assert lora.base.families == {family}
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora = _write_keys(tmp_path / "te.safetensors",
                       {f"{te}.lora_down.weight": (1, 1024), f"{te}.lora_up.weight": (1024, 1)})
    assert lora.base.families == {"sd2"}
    tiny = write_tiny_lora(tmp_path / "meta.safetensors", sd1.info, base_model_version="sd_v2", include_te=False)
    assert LoraFile(tiny["path"]).base.families == {"sd2"}
    with pytest.raises(InvalidRequest, match="is for SD2 but the model 'tiny-sd1' is SD1"):
        apply_loras(sd1.model, [(LoraFile(tiny["path"]), 1.0)])
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    flux = _write_keys(tmp_path / "flux.safetensors",
                       {f"{qkv}.lora_down.weight": (1, 8), f"{qkv}.lora_up.weight": (8, 1)})
    with pytest.raises(InvalidRequest, match="is for Flux, which Darkroom does not run"):
        apply_loras(sd1.model, [(flux, 1.0)])
    loha = _write_keys(tmp_path / "loha.safetensors", {f"lora_unet_{TO_K.replace('.', '_')}.hada_w1_a": (32, 2),
                                                      f"lora_unet_{TO_K.replace('.', '_')}.hada_w1_b": (2, 32)})
    with pytest.raises(InvalidRequest, match="LoHa"):
        apply_loras(sd1.model, [(loha, 1.0)])


# --------------------------------------------------------------------------- library


def _data_hash(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_library_finds_resolves_and_describes(tmp_path, tiny_model):
    info = tiny_model("sd1")
    webui, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    home = Home(tmp_path / "home", extra_model_dirs=[webui, comfy]).ensure()
    small = dict(include_te=False, conv=False, rank=1)
    tags = {"10_pixel": {" pixel art": 10, "retro": 3}, "5_extra": {"retro": 9, "8bit": 1}}
    write_tiny_lora(home.loras / "pixel-art.safetensors", info, **small, output_name="pixelart_v2",
                    tag_frequency=tags, base_model_version=True)
    write_tiny_lora(webui / "models/Lora/styles/Ink Wash.safetensors", info, **small,
                    metadata={"sshs_model_hash": "ab" * 32})
    write_tiny_lora(comfy / "models/loras/detail.safetensors", info, **small)
    (home.loras / "legacy.pt").write_bytes(b"\x80\x02not really a pickle")
    (home.loras / "detail.pt").write_bytes(b"\x80\x02a pickled twin of detail")
    library = LoraLibrary(home)

    entries = {e.name: e for e in library.list()}
    assert set(entries) == {"pixel-art", "Ink Wash", "detail", "legacy"}  # detail.pt listed as detail too
    assert len(library.list()) == 5
    pixel = entries["pixel-art"]
    assert pixel.alias == "pixelart_v2" and pixel.base_model == "SD1"
    assert pixel.trigger_words == ["retro", "pixel art", "8bit"]
    assert pixel.to_dict()["metadata"]["ss_output_name"] == "pixelart_v2"
    assert "pickled" in entries["legacy"].error
    assert entries["Ink Wash"].short_hash == "abababababab"  # kohya's precomputed hash, as the webui uses

    assert library.resolve("pixel-art").path == home.loras / "pixel-art.safetensors"
    assert library.resolve("PIXEL-ART").name == "pixel-art"
    assert library.resolve("pixelart_v2").name == "pixel-art"  # by alias
    assert library.resolve("ink wash").path == webui / "models/Lora/styles/Ink Wash.safetensors"
    assert library.resolve("detail.safetensors").path == comfy / "models/loras/detail.safetensors"
    assert library.resolve("detail").path == comfy / "models/loras/detail.safetensors"  # not the .pt twin
    with pytest.raises(ModelLoadError, match="pickled LoRA"):
        library.resolve("legacy")
    with pytest.raises(ModelNotFound) as e:
        library.resolve("nope")
    for folder in (home.loras, webui / "models/Lora", comfy / "models/loras"):
        assert str(folder) in str(e.value)
    assert "'nope'" in str(e.value)

    detail = library.resolve("detail")
    assert detail.short_hash == _data_hash(detail.path)[:12]
    assert library.sha256(detail) == hashlib.sha256(detail.path.read_bytes()).hexdigest()
    _, tags_found = extract_lora_tags("<lora:pixelart_v2:0.7> <lora:Ink Wash>")
    uses = library.uses(tags_found)
    assert [(u.lora.name, u.te_weight, u.mentioned_name) for u in uses] == [
        ("pixel-art", 0.7, "pixelart_v2"), ("Ink Wash", 1.0, "Ink Wash")]
    pixel_hash = _data_hash(home.loras / "pixel-art.safetensors")[:12]
    assert lora_hashes_infotext(uses) == f"pixelart_v2: {pixel_hash}, Ink Wash: abababababab"
    odd = [LoraUse(detail, 1.0, name="de:tail,v2")]
    assert lora_hashes_infotext(odd) == f"detailv2: {detail.short_hash}"
    assert json.loads(pixel.metadata["ss_tag_frequency"]) == tags


def test_prompt_tags_drive_the_engine(sd1):
    """`<lora:name:w>` in the prompt: applied for that request only, recorded as the webui records it."""
    write_tiny_lora(sd1.home.loras / "inked.safetensors", sd1.info, alpha=2.0)
    from darkroom.api import build_engine

    engine_req = REQ.model_copy(update={"prompt": "a red circle <lora:inked:0.8>"})
    eng = build_engine(sd1.home, device="cpu", precision="fp32")
    saved = snapshot(eng.load(REQ))
    with_lora = eng.generate(engine_req).images[0]
    assert with_lora.png != eng.generate(REQ).images[0].png
    assert "<lora:inked:0.8>" in with_lora.infotext  # the prompt keeps its tags
    assert 'Lora hashes: "inked: ' in with_lora.infotext
    zero = eng.generate(REQ.model_copy(update={"prompt": "a red circle <lora:inked:0>"})).images[0]
    plain = eng.generate(REQ).images[0]
    assert _pixels(zero) == _pixels(plain)
    with pytest.raises(ModelNotFound, match="nope"):
        eng.generate(REQ.model_copy(update={"prompt": "x <lora:nope:1>"}))
    assert_unchanged(eng.load(REQ), saved)


def _pixels(image) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image.png)).convert("RGB").tobytes()
