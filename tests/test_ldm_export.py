"""Tiny LDM single files must convert back, through diffusers' own converters, to the exact
diffusers tensors they were written from, and carry the key facts real files have."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import darkroom  # noqa: F401  (offline before diffusers/transformers)
from darkroom.testing import ldm_export
from darkroom.testing.tiny import build_tiny_checkpoint, save_diffusers_folder

safetensors_torch = pytest.importorskip("safetensors.torch")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

OPEN_CLIP_PREFIX = {
    "sd2": "cond_stage_model.model.",
    "sdxl": "conditioner.embedders.1.model.",
    "sdxl-refiner": "conditioner.embedders.0.model.",
}

CASES = [
    ("sd1", {}),
    ("sd1", {"old_te_keys": True, "ema": True, "dtype": torch.float16}),
    ("sd1", {"inpainting": True, "v_prediction": True, "dtype": torch.bfloat16}),
    ("sd2", {}),
    ("sd2", {"inpainting": True, "v_prediction": True, "ema": True, "dtype": torch.float16}),
    ("sdxl", {}),
    ("sdxl", {"ema": True, "v_prediction": True, "dtype": torch.bfloat16}),
    ("sdxl", {"inpainting": True, "dtype": torch.float16}),
    ("sdxl-refiner", {}),
    ("sdxl-refiner", {"ema": True, "dtype": torch.float16}),
]


def _case_id(case):
    family, kw = case
    flags = [k if v is True else str(v).removeprefix("torch.") for k, v in kw.items()]
    return "-".join([family, *flags])


_CACHE: dict = {}


@pytest.fixture(scope="module", params=CASES, ids=[_case_id(c) for c in CASES])
def built(request, tmp_path_factory):
    family, kw = request.param
    key = _case_id(request.param)
    if key not in _CACHE:
        path = tmp_path_factory.mktemp("ckpt") / f"{key}.safetensors"
        result = build_tiny_checkpoint(path, family, **kw)
        _CACHE[key] = (family, kw, result, safetensors_torch.load_file(str(path)))
    return _CACHE[key]


def _with_text_model(sd):
    """diffusers' converters emit `text_model.*`; transformers >= 5.6 flattens CLIPTextModel."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in sd.items()}


def _assert_same(got: dict, want: dict):
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert not extra and not missing, (extra[:5], missing[:5])
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def test_unet_round_trip(built):
    family, kw, result, ckpt = built
    config = result["configs"]["unet"]
    _assert_same(sfu.convert_ldm_unet_checkpoint(ckpt, config), result["state_dicts"]["unet"])
    if kw.get("ema"):
        ema = sfu.convert_ldm_unet_checkpoint(ckpt, config, extract_ema=True)
        _assert_same(ema, result["state_dicts"]["unet_ema"])
        main = result["state_dicts"]["unet"]
        assert not torch.equal(ema["conv_in.weight"], main["conv_in.weight"])


def test_vae_round_trip(built):
    _, _, result, ckpt = built
    got = sfu.convert_ldm_vae_checkpoint(ckpt, result["configs"]["vae"])
    _assert_same(got, result["state_dicts"]["vae"])


def test_clip_l_round_trip(built):
    family, kw, result, ckpt = built
    if family not in ("sd1", "sdxl"):
        assert not any(".transformer.text_model." in k for k in ckpt)
        return
    got = sfu.convert_ldm_clip_checkpoint(ckpt)
    ids = got.pop("embeddings.position_ids" if kw.get("old_te_keys") else
                  "text_model.embeddings.position_ids")
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    want = result["state_dicts"]["text_encoder"]
    if kw.get("old_te_keys"):
        _assert_same(got, {k.removeprefix("text_model."): v for k, v in want.items()})
    else:
        _assert_same(got, _with_text_model(want))


def test_open_clip_round_trip(built):
    family, _, result, ckpt = built
    if family == "sd1":
        assert not any(".model.transformer.resblocks." in k for k in ckpt)
        return
    name = "text_encoder" if family == "sd2" else "text_encoder_2"
    config = result["configs"][name]
    # The converter only reads `config.hidden_size`, and only when no text_projection.
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
    got = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=OPEN_CLIP_PREFIX[family])
    want = _with_text_model(result["state_dicts"][name])
    if family == "sd2":
        # The file's extra (24th-style) block: diffusers only skips it at index 23.
        extra = f"text_model.encoder.layers.{config['num_hidden_layers']}."
        assert any(k.startswith(extra) for k in got)
        got = {k: v for k, v in got.items() if not k.startswith(extra)}
    _assert_same(got, want)


def test_file_facts(built):
    """Names, shapes and dtypes as real SD1/SD2/SDXL files have them."""
    family, kw, result, ckpt = built
    dtype = kw.get("dtype", torch.float32)
    unet = "model.diffusion_model."
    cfg = result["configs"]
    in_ch = 9 if kw.get("inpainting") else 4
    assert ckpt[unet + "input_blocks.0.0.weight"].shape[1] == in_ch
    assert ckpt[unet + "out.2.weight"].shape[0] == 4
    assert ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert ckpt["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape[2:] == (1, 1)
    floats = {v.dtype for k, v in ckpt.items() if v.is_floating_point()}
    assert floats == {dtype}
    if family == "sd1":
        assert ckpt[unet + "input_blocks.1.1.proj_in.weight"].ndim == 4
        te = "cond_stage_model.transformer." + ("" if kw.get("old_te_keys") else "text_model.")
        assert ckpt[te + "embeddings.token_embedding.weight"].shape == (49408, 32)
        assert ckpt[te + "embeddings.position_ids"].dtype == torch.int64
        assert unet + "label_emb.0.0.weight" not in ckpt
    if family == "sd2":
        assert ckpt[unet + "input_blocks.1.1.proj_in.weight"].ndim == 2
        oc = "cond_stage_model.model."
        w = cfg["text_encoder"]["hidden_size"]
        assert ckpt[oc + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * w, w)
        assert ckpt[oc + "positional_embedding"].shape == (77, w)
        assert ckpt[oc + "text_projection"].shape == (w, w)
        assert ckpt[oc + "logit_scale"].ndim == 0
        blocks = {int(k.split(".")[4]) for k in ckpt if k.startswith(oc + "transformer.resblocks.")}
        assert blocks == set(range(cfg["text_encoder"]["num_hidden_layers"] + 1))
        other = ("cond_stage_model.transformer.", "conditioner.")
        assert not any(k.startswith(other) for k in ckpt)
    if family.startswith("sdxl"):
        assert not any(k.startswith("cond_stage_model.") for k in ckpt)
        assert "alphas_cumprod" not in ckpt
        te2 = cfg["text_encoder_2"]
        oc = OPEN_CLIP_PREFIX[family]
        # open_clip stores x @ text_projection: [width, proj] = HF weight transposed.
        assert ckpt[oc + "text_projection"].shape == (te2["hidden_size"], te2["projection_dim"])
        in_proj_bias = ckpt[oc + "transformer.resblocks.0.attn.in_proj_bias"]
        assert in_proj_bias.shape == (3 * te2["hidden_size"],)
        n_time = 5 if family == "sdxl-refiner" else 6
        label_in = n_time * cfg["unet"]["addition_time_embed_dim"] + te2["projection_dim"]
        assert ckpt[unet + "label_emb.0.0.weight"].shape[1] == label_in
        assert cfg["unet"]["projection_class_embeddings_input_dim"] == label_in
        # first level has no attention: the first transformer is at level 1
        assert unet + "input_blocks.1.1.proj_in.weight" not in ckpt
        level1 = 2 + cfg["unet"]["layers_per_block"]
        assert ckpt[unet + f"input_blocks.{level1}.1.proj_in.weight"].ndim == 2
    if family == "sdxl":
        te1 = cfg["text_encoder"]
        assert te1["hidden_size"] != cfg["text_encoder_2"]["hidden_size"]
        assert cfg["unet"]["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
        depth = cfg["unet"]["transformer_layers_per_block"]
        assert len(set(depth)) > 1
        assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in ckpt
    if family == "sdxl-refiner":
        assert not any(k.startswith("conditioner.embedders.1.") for k in ckpt)
        assert len(cfg["unet"]["block_out_channels"]) == 4
    if family in ("sd1", "sd2"):
        assert ckpt["alphas_cumprod"].shape == (1000,)
    if kw.get("ema"):
        assert ckpt["model_ema.decay"].dtype == dtype  # cast like model.half() would
        assert ckpt["model_ema.num_updates"].dtype == torch.int32
        assert "model_ema.diffusion_modelinput_blocks00weight" in ckpt
        n_unet = sum(k.startswith(unet) for k in ckpt)
        assert sum(k.startswith("model_ema.diffusion_model") for k in ckpt) == n_unet
    else:
        assert not any(k.startswith("model_ema.") for k in ckpt)


def test_metadata(built):
    family, kw, result, _ = built
    with open(result["path"], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header["__metadata__"]
    configs = json.loads(meta["darkroom_config"])
    assert configs == result["configs"]
    assert set(configs) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert (configs["text_encoder"] is None) == (family == "sdxl-refiner")
    assert (configs["text_encoder_2"] is None) == (family in ("sd1", "sd2"))
    assert configs["unet"]["_class_name"] == "UNet2DConditionModel"
    assert (meta.get("v_pred") == "true") == bool(kw.get("v_prediction"))
    assert ("v_pred" in header) == bool(kw.get("v_prediction") and family.startswith("sdxl"))


def test_schedule_buffers_match_diffusers():
    from diffusers import DDPMScheduler

    buffers = ldm_export.ldm_schedule_buffers()
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(buffers["betas"], ref.betas, atol=1e-7)
    assert torch.allclose(buffers["alphas_cumprod"], ref.alphas_cumprod, atol=1e-6)
    assert buffers["alphas_cumprod_prev"][0] == 1.0
    assert math.isclose(buffers["alphas_cumprod"][-1].item(), 0.0046, abs_tol=1e-4)
    assert len(buffers) == 12 and all(v.dtype == torch.float32 for v in buffers.values())


def test_same_seed_same_file_other_seed_other_weights(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a.safetensors", "sd1", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b.safetensors", "sd1", seed=3)
    c = build_tiny_checkpoint(tmp_path / "c.safetensors", "sd1", seed=4)
    # (not byte-equal: safetensors writes the metadata map in arbitrary key order)
    assert a["metadata"] == b["metadata"]
    fa, fb = (safetensors_torch.load_file(str(r["path"])) for r in (a, b))
    _assert_same(fa, fb)
    assert not torch.equal(a["ldm"]["model.diffusion_model.out.2.weight"],
                           c["ldm"]["model.diffusion_model.out.2.weight"])
    sd = a["state_dicts"]["unet"]
    norms = [v for k, v in sd.items() if k.endswith("norm1.weight")]
    assert not torch.equal(norms[0], torch.ones_like(norms[0]))  # jittered: swaps show up


def test_unknown_key_is_loud():
    with pytest.raises(ValueError, match="no LDM name"):
        ldm_export.unet_to_ldm(
            {"time_embedding.cond_proj.weight": torch.zeros(1)},
            {"block_out_channels": [32], "layers_per_block": 1},
        )
    with pytest.raises(ValueError):
        build_tiny_checkpoint("/nonexistent/x.safetensors", "sd3")


# sd2 and sdxl between them cover both text-encoder layouts, all three prefixes' kinds,
# both schedulers and both tokenizer pads; sd1/refiner are covered by the converter tests.
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_diffusers_folder_and_from_single_file(tmp_path, family):
    """The folder loads with diffusers offline and, used as `config=`, lets diffusers'
    own single-file loader read our LDM file back to the exact weights (folder built with
    another seed, so the weights can only have come from the file)."""
    import diffusers

    ckpt = build_tiny_checkpoint(tmp_path / "m.safetensors", family, seed=1)
    folder = save_diffusers_folder(tmp_path / "folder", family, seed=2)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    tok = pipe.tokenizer_2 if family == "sdxl-refiner" else pipe.tokenizer
    assert tok("a cat").input_ids == [49406, 320, 2368, 49407]
    if family.startswith("sdxl"):
        assert pipe.tokenizer_2.pad_token == "!"
    single = type(pipe).from_single_file(str(ckpt["path"]), config=str(folder))
    for name, want in ckpt["state_dicts"].items():
        got = getattr(single, name).state_dict()
        _assert_same(_with_text_model(got), _with_text_model(want))
