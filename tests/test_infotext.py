"""Infotext writing and reading: exact webui layout, real-world texts, round trips."""

from __future__ import annotations

import pytest

from darkroom.errors import InvalidRequest
from darkroom.metadata.infotext import (
    build_infotext,
    format_value,
    parse_infotext,
    request_from_infotext,
    split_sampler,
)
from darkroom.request import GenerationRequest

A1111_110 = (
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:detail_tweaker:0.8>\n"
    "Negative prompt: (worst quality, low quality:1.4), bad hands\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3193519405,"
    " Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44,"
    " VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2,"
    " Hires upscale: 2, Hires steps: 15, Hires upscaler: 4x-UltraSharp,"
    ' Lora hashes: "detail_tweaker: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03",'
    " Version: v1.10.1"
)
FORGE = (
    "a cat on a windowsill, golden hour\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5,"
    " Seed: 1234567890, Size: 896x1152, Model hash: 0dd0a1f9cd, Model: flux1-dev-bnb-nf4-v2,"
    " Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: ae, Module 2: clip_l,"
    " Module 3: t5xxl_fp8_e4m3fn"
)
SDCPP_OLD = (
    "a lovely cat\n"
    "Steps: 20, CFG scale: 7.000000, Seed: 42, Size: 512x512,"
    " Model: v1-5-pruned-emaonly.safetensors, RNG: cuda, Sampler: euler_a,"
    " Version: stable-diffusion.cpp"
)
SDCPP_KARRAS = (
    "a lovely cat\n"
    "Steps: 20, CFG scale: 7.000000, Guidance: 3.500000, Eta: 0.000000, Seed: 42,"
    " Size: 512x512, Model: v1-5-pruned-emaonly.safetensors, RNG: cuda, Sampler: euler karras,"
    " Version: stable-diffusion.cpp"
)
SDCPP_NEW = (
    "a lovely cat\n"
    "Negative prompt: blurry\n"
    "Steps: 30, Sampler: dpm++2m sgm_uniform, CFG scale: 5.500000, Seed: 7, Size: 768x1024,"
    " Model: sd_xl_base_1.0.safetensors, VAE: sdxl_vae.safetensors, Clip skip: 2,"
    " Version: stable-diffusion.cpp"
)
OLD_A1111 = (
    "portrait of a knight,\n"
    "highly detailed, (armor:1.1)\n"
    "Negative prompt: lowres,\n"
    "blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 2766478016, Size: 512x512,"
    " Model hash: 81761151, Model: v1-5-pruned-emaonly"
)
OLDEST_A1111 = (
    "girl with an artist's beret, determined, blue eyes\n"
    "Negative prompt: ugly, fat\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512,"
    " Model hash: 45dee52b"
)


def test_exact_webui_layout():
    req = GenerationRequest(
        prompt="a photo of a cat", negative_prompt="blurry", sampler="DPM++ 2M",
        schedule="Automatic", steps=20, cfg_scale=7, seed=-1, width=512, height=512,
    )
    text = build_infotext(
        req, seed=965400086, model_name="v1-5-pruned-emaonly", model_hash="6ce0161689",
        schedule_label="Karras",
    )
    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086,"
        " Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly,"
        " Version: darkroom-0.1.0"
    )


def test_layout_leaves_out_empty_negative_none_values_and_clip_skip_1():
    req = GenerationRequest(prompt="cat", cfg_scale=7.5, width=640, height=512, clip_skip=1)
    text = build_infotext(req, seed=1, model_name=None, model_hash=None, version="9.9.9")
    assert text == (
        "cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7.5, Seed: 1,"
        " Size: 640x512, Version: darkroom-9.9.9"
    )
    assert "Negative prompt" not in text


def test_clip_skip_extras_order_and_quoting():
    req = GenerationRequest(width=512, height=512, prompt="cat", clip_skip=2, eta=0.5)
    text = build_infotext(
        req, seed=3, model_name="my, model", model_hash="abc1234567",
        extra={"Hires upscale": 2.0, "Lora hashes": "a: 1a2b, b: 3c4d", "ENSD": 31337,
               "RNG": "CPU", "Skipped": None},
    )
    params = text.splitlines()[-1]
    assert params == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 3,"
        ' Size: 512x512, Model hash: abc1234567, Model: "my, model", Clip skip: 2, ENSD: 31337,'
        ' RNG: CPU, Eta: 0.5, Hires upscale: 2, Lora hashes: "a: 1a2b, b: 3c4d",'
        " Version: darkroom-0.1.0"
    )
    assert "Skipped" not in params
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == "a: 1a2b, b: 3c4d"
    assert parsed["Model"] == "my, model"


def test_extra_key_that_would_not_parse_back_is_refused():
    with pytest.raises(ValueError, match="would not parse back"):
        build_infotext(GenerationRequest(width=512, height=512), seed=1, model_name=None, model_hash=None,
                       extra={"Bad: key": 1})


@pytest.mark.parametrize(("value", "text"), [
    (7, "7"), (7.0, "7"), (7.5, "7.5"), (0.45, "0.45"), (1.0e-5, "1e-05"), ("x", "x"),
])
def test_format_value(value, text):
    assert format_value(value) == text


ROUND_TRIP = [
    GenerationRequest(width=512, height=512),
    GenerationRequest(width=512, height=512, prompt="a cat, on a mat: sitting", negative_prompt="dog, \"bad\": 1"),
    GenerationRequest(
        prompt="line one, (detail:1.2)\nline two: colon\n\nafter a blank line",
        negative_prompt="neg one\nneg two, commas", sampler="Euler a", schedule="Karras",
        steps=35, cfg_scale=4.5, seed=4294967295, width=1024, height=768, clip_skip=2,
        model="sd_xl_base_1.0",
    ),
    GenerationRequest(width=512, height=512, prompt='quoted "words" and \\backslash\\', negative_prompt="x",
                      sampler="DPM++ SDE", schedule="Align Your Steps", cfg_scale=12.25),
    GenerationRequest(width=512, height=512, prompt="日本語のプロンプト, ünïcode", sampler="UniPC",
                      model="my, odd: model",
                      clip_skip=12, eta=0.0, seed=0),
    GenerationRequest(width=512, height=512, prompt="", negative_prompt="only negative"),
    GenerationRequest(width=512, height=512, prompt="trailing newline kept\n", seed=1),
]


@pytest.mark.parametrize("req", ROUND_TRIP)
def test_round_trip(req: GenerationRequest):
    model_hash = "0123456789" if req.model else None  # a lone hash is read back as the model
    text = build_infotext(req, seed=req.seed, model_name=req.model, model_hash=model_hash)
    assert request_from_infotext(text) == req


def test_round_trip_uses_resolved_schedule_and_seed():
    req = GenerationRequest(width=512, height=512, prompt="cat", seed=-1, schedule="Automatic")
    text = build_infotext(req, seed=77, model_name=None, model_hash=None,
                          schedule_label="Karras")
    back = request_from_infotext(text)
    assert (back.seed, back.schedule) == (77, "Karras")


def test_parse_a1111_110():
    p = parse_infotext(A1111_110)
    assert p["Prompt"].endswith("<lora:detail_tweaker:0.8>")
    assert p["Negative prompt"] == "(worst quality, low quality:1.4), bad hands"
    assert p["Lora hashes"] == "detail_tweaker: 7c6bad76eb54"
    assert p["TI hashes"] == "easynegative: c74b4e810b03"
    assert p["Hires upscaler"] == "4x-UltraSharp"
    assert p["Size"] == "512x768" and p["Version"] == "v1.10.1"
    req = request_from_infotext(A1111_110)
    assert (req.sampler, req.schedule, req.steps, req.cfg_scale) == ("DPM++ 2M", "Karras", 28, 6.5)
    assert (req.seed, req.width, req.height, req.clip_skip) == (3193519405, 512, 768, 2)
    assert req.model == "v1-5-pruned-emaonly"


def test_parse_forge():
    p = parse_infotext(FORGE)
    assert p["Version"] == "f2.0.1v1.10.1-previous-313-g8a042934"
    assert p["Distilled CFG Scale"] == "3.5" and p["Module 3"] == "t5xxl_fp8_e4m3fn"
    assert p["Negative prompt"] == ""
    req = request_from_infotext(FORGE)
    assert (req.sampler, req.schedule, req.cfg_scale) == ("Euler", "Simple", 1.0)
    assert (req.width, req.height, req.model) == (896, 1152, "flux1-dev-bnb-nf4-v2")


@pytest.mark.parametrize(("text", "sampler", "schedule"), [
    (SDCPP_OLD, "Euler a", "Uniform"),
    (SDCPP_KARRAS, "Euler", "Karras"),
    (SDCPP_NEW, "DPM++ 2M", "SGM Uniform"),
])
def test_parse_stable_diffusion_cpp(text, sampler, schedule):
    req = request_from_infotext(text)
    assert (req.sampler, req.schedule) == (sampler, schedule)
    assert req.prompt == "a lovely cat"
    assert req.eta is None  # sd.cpp's Eta is DDIM eta, not ancestral noise
    assert req.model.endswith(".safetensors")


def test_parse_stable_diffusion_cpp_values():
    req = request_from_infotext(SDCPP_NEW)
    assert (req.steps, req.cfg_scale, req.seed, req.clip_skip) == (30, 5.5, 7, 2)
    assert (req.width, req.height, req.negative_prompt) == (768, 1024, "blurry")


def test_parse_old_a1111_combined_sampler_and_multiline():
    p = parse_infotext(OLD_A1111)
    assert p["Prompt"] == "portrait of a knight,\nhighly detailed, (armor:1.1)"
    assert p["Negative prompt"] == "lowres,\nblurry"
    assert p["Model hash"] == "81761151"
    req = request_from_infotext(OLD_A1111)
    assert (req.sampler, req.schedule, req.cfg_scale) == ("DPM++ 2M", "Karras", 7.5)


def test_oldest_a1111_falls_back_to_model_hash():
    req = request_from_infotext(OLDEST_A1111)
    assert (req.sampler, req.schedule, req.model) == ("Euler a", "Automatic", "45dee52b")
    assert req.clip_skip == 1


def test_windows_line_endings():
    req = request_from_infotext(OLD_A1111.replace("\n", "\r\n"))
    assert req.negative_prompt == "lowres,\nblurry"
    assert req.seed == 2766478016


@pytest.mark.parametrize(("written", "sampler", "schedule"), [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("Euler a Exponential", "Euler a", "Exponential"),
    ("DPM++ SDE SGM Uniform", "DPM++ SDE", "SGM Uniform"),
    ("Euler Uniform", "Euler", "Uniform"),
    ("DPM++ 2M SDE Polyexponential", "DPM++ 2M SDE", "Polyexponential"),
    ("Euler Align Your Steps", "Euler", "Align Your Steps"),
    ("DPM++ 2M KL Optimal", "DPM++ 2M", "KL Optimal"),
    ("Heun Beta", "Heun", "Beta"),
    ("DDIM", "DDIM", "Automatic"),
    ("UniPC", "UniPC", "Automatic"),
    ("Some Future Sampler", "Some Future Sampler", "Automatic"),
    ("euler_a", "Euler a", "Automatic"),
    ("dpm2", "DPM2", "Automatic"),
    ("dpm++2s_a karras", "DPM++ 2S a", "Karras"),
    ("dpm++2mv2 exponential", "DPM++ 2M", "Exponential"),
    ("lcm", "LCM", "Automatic"),
    ("ddim_trailing discrete", "DDIM", "Uniform"),
    ("heun ays", "Heun", "Align Your Steps"),
    ("tcd", "tcd", "Automatic"),
])
def test_split_sampler(written, sampler, schedule):
    assert split_sampler(written, None) == (sampler, schedule)


def test_combined_name_wins_over_schedule_type():
    assert split_sampler("DPM++ 2M Karras", "Exponential") == ("DPM++ 2M", "Karras")
    assert split_sampler("Euler", "karras") == ("Euler", "Karras")


def test_quoted_value_with_escapes_is_unquoted():
    text = ('p\nSteps: 1, Sampler: Euler, Seed: 2, Template: "a \\"b\\", c:\\nd",'
            ' Size: 64x64')
    p = parse_infotext(text)
    assert p["Template"] == 'a "b", c:\nd'
    assert p["Size"] == "64x64"


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    p = parse_infotext("a cat\nstyle: photo, mood: calm")
    assert p == {"Prompt": "a cat\nstyle: photo, mood: calm", "Negative prompt": ""}


@pytest.mark.parametrize("text", ["", "just a prompt", "a cat\nNegative prompt: dog"])
def test_no_parameter_line_is_invalid_request(text):
    with pytest.raises(InvalidRequest, match="no generation parameters line"):
        request_from_infotext(text)


@pytest.mark.parametrize(("text", "message"), [
    ("p\nSteps: many, Sampler: Euler, Seed: 1", "'Steps: many' is not a number"),
    ("p\nSteps: 20, Sampler: Euler, Size: big", "not WIDTHxHEIGHT"),
    ("p\nSteps: 20, Sampler: Euler, Size: 513x512", "Size width .*multiple of 8"),
    ("p\nSteps: 9999, Sampler: Euler, Seed: 1", "Steps"),
    ("p\nSteps: 20, Sampler: Euler, Seed: 18446744073709551616", "Seed"),  # past 64 bits
])
def test_bad_values_are_invalid_request(text, message):
    with pytest.raises(InvalidRequest, match=message):
        request_from_infotext(text)
