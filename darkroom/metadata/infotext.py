"""The AUTOMATIC1111 "infotext": the generation parameters text stored inside images.

CivitAI, the webui's PNG Info tab, Forge, stable-diffusion.cpp and most other tools read
and write this layout, so writing it exactly is what makes a Darkroom image reproducible
elsewhere, and reading it is how a user reuses the settings of an image found anywhere.

Layout (see /work/shared/reference/infotext.md)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>     (left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import pydantic

import darkroom
from darkroom.errors import InvalidRequest
from darkroom.request import GenerationRequest

# One `key: value` pair of the parameter line; a value is a JSON string or runs to the next
# comma. The webui counts a last line as the parameter line only with >= 3 such pairs.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# The pieces of _PARAM_RE that `parameter_pairs` uses to read a line in linear time.
_KEY_RUN = re.compile(r"[\w \-/]*")
_WORD = re.compile(r"\w")
_VALUE_SPACE = re.compile(r"\s*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
_PLAIN = re.compile(r"[^,]*")
_VALUE_END = re.compile(r",|$")
_MIN_PARAMS = 3
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_NEGATIVE = "Negative prompt:"

# Key order of the webui's create_infotext; unknown extras follow these, Version ends.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
    "Face restoration", "Size", "Model hash", "Model", "FP8 weight",
    "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "Tiling", "Eta",
)

# Schedule labels as the webui (and Forge) spell them, with their internal names. Legacy
# infotexts fold these into the sampler name ("DPM++ 2M Karras").
SCHEDULE_LABELS = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
    "exponential": "Exponential", "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform", "sgmuniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal",
    "ddim": "DDIM", "beta": "Beta", "turbo": "Turbo",
    "align_your_steps_gits": "Align Your Steps GITS",
    "align_your_steps_11": "Align Your Steps 11", "align_your_steps_32": "Align Your Steps 32",
}
# Longest first so "Euler SGM Uniform" loses "SGM Uniform", not just "Uniform".
_SUFFIXES = {
    s: v for k, v in SCHEDULE_LABELS.items() if k != "automatic" for s in (k, v.lower())
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# stable-diffusion.cpp writes its CLI names: "Sampler: euler_a karras". Names the webui
# lacks map to themselves: listing them still lets "tcd karras" be split.
SDCPP_SAMPLERS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2",
    "dpm++2s_a": "DPM++ 2S a", "dpm++2m": "DPM++ 2M", "dpm++2mv2": "DPM++ 2M",
    "dpm++2m_sde": "DPM++ 2M SDE", "lms": "LMS", "lcm": "LCM", "ddim_trailing": "DDIM",
    "ipndm": "ipndm", "ipndm_v": "ipndm_v", "tcd": "tcd", "res_multistep": "res_multistep",
    "res_2s": "res_2s", "er_sde": "er_sde", "euler_cfg_pp": "euler_cfg_pp",
    "euler_a_cfg_pp": "euler_a_cfg_pp", "euler_ge": "euler_ge",
    "dpm++2m_sde_bt": "dpm++2m_sde_bt",
}
# "discrete" is the model's own timestep spacing, the webui's "Uniform"; "default" was
# written by old versions for "whatever the model uses", which for SD 1.x/SDXL is discrete.
SDCPP_SCHEDULES = {
    "default": "Uniform", "discrete": "Uniform", "karras": "Karras",
    "exponential": "Exponential", "ays": "Align Your Steps", "gits": "Align Your Steps GITS",
    "sgm_uniform": "SGM Uniform", "simple": "Simple", "kl_optimal": "KL Optimal",
    "smoothstep": "smoothstep", "lcm": "lcm", "bong_tangent": "Bong Tangent",
}
SDCPP_VERSION = "stable-diffusion.cpp"


def format_value(value: object) -> str:
    """Write a value as the webui does: whole floats without ".0" (CFG 7 -> "7")."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _quote(text: str) -> str:
    """JSON-quote a value that would otherwise break the `k: v, k: v` line."""
    if "," in text or ":" in text or "\n" in text or '"' in text[:1]:
        return json.dumps(text, ensure_ascii=False)
    return text


def _ordered(params: Mapping[str, object]) -> list[tuple[str, object]]:
    rank = {k: i for i, k in enumerate(KEY_ORDER)}
    keys = [k for k in params if k != "Version"]
    keys.sort(key=lambda k: rank.get(k, len(rank)))  # stable: extras keep their order
    if "Version" in params:
        keys.append("Version")
    return [(k, params[k]) for k in keys]


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Assemble an infotext from prompts and parameters (None values are left out).

    Keys are placed in the webui's order; keys it does not know follow in the given order,
    and "Version" comes last.
    """
    pairs = []
    for key, value in _ordered(params):
        if value is None:
            continue
        if not re.fullmatch(r"\w[\w \-/]+", key):
            raise ValueError(f"infotext key {key!r} would not parse back (letters, digits,"
                             " spaces, '-' and '/' only, at least 2 characters)")
        pairs.append(f"{key}: {_quote(format_value(value))}")
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def build_infotext(
    req: GenerationRequest,
    *,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
    schedule_label: str | None = None,
    extra: dict[str, object] | None = None,
    version: str = darkroom.__version__,
) -> str:
    """The infotext for one image of `req`, exactly as the webui lays it out.

    `seed` is the image's resolved seed (req.seed may be -1); `schedule_label` the schedule
    actually used when req.schedule is "Automatic". `extra` keys override or add to the
    standard ones (a None value removes one). The version is written as "darkroom-X.Y.Z",
    which the webui's backward-compatibility check ignores, as it should.
    """
    params: dict[str, object] = {
        "Steps": req.steps,
        "Sampler": req.sampler,
        "Schedule type": schedule_label or req.schedule,
        "CFG scale": float(req.cfg_scale),
        "Seed": seed,
        "Size": f"{req.width}x{req.height}" if req.width and req.height else None,
        "Model hash": model_hash or None,
        "Model": model_name or None,
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "Eta": req.eta,
        # RNG when not Darkroom's default CPU (the engine writes it always); ENSD when set (the engine drops
        # it, via `extra`, for samplers that draw no later noise, as the webui does)
        "RNG": req.randn_source if req.randn_source != "CPU" else None,
        "ENSD": req.eta_noise_seed_delta or None,
        "Tiling": "True" if req.tiling else None,  # as the webui writes it
    }
    params.update(extra or {})
    params["Version"] = (extra or {}).get("Version", f"darkroom-{version}")
    return format_infotext(req.prompt, req.negative_prompt, params)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            loaded = json.loads(value)
        except ValueError:
            return value
        return loaded if isinstance(loaded, str) else value
    return value


def parameter_pairs(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a parameter line: what `_PARAM_RE.findall(line)` gives, in linear time.

    The regex alone is quadratic: on a run of key characters with no colon after it (a long
    prompt on one line, a pasted file) it starts a match at every character and scans to the
    run's end each time, so 70,000 characters take 20 s and a megabyte hours. Here each colon is
    looked at once: a key is the run of key characters just before it (from its first word
    character, at least two characters long), and its value is read as the regex reads it.
    """
    pairs = []
    pos = 0
    while (colon := line.find(":", pos)) >= 0:
        run = len(_KEY_RUN.match(line[pos:colon][::-1])[0])
        word = _WORD.search(line, colon - run, colon - 1)  # a key has one more character after it
        if word is None:
            pos = colon + 1
            continue
        start = _VALUE_SPACE.match(line, colon + 1).end()
        quoted = _QUOTED.match(line, start)
        end = _VALUE_END.match(line, quoted.end()) if quoted else None
        if end is None:  # not a JSON string followed by a comma or the end: the value runs to the next comma
            quoted = _PLAIN.match(line, start)
            end = _VALUE_END.match(line, quoted.end())
        pairs.append((line[word.start():colon], quoted[0]))
        pos = end.end()
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Parse an infotext the way the webui's PNG Info does.

    Returns "Prompt", "Negative prompt" and every parameter key as written, with values as
    strings (JSON-quoted ones unquoted). Without a parameter line only the two prompt keys
    are present. Prompt lines are stripped of surrounding spaces, as in the webui.
    """
    *lines, last = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    pairs = parameter_pairs(last)
    if len(pairs) < _MIN_PARAMS:
        lines.append(last)
        pairs = []
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        result[key] = _unquote(value)
    return result


def split_sampler(sampler: str, schedule: str | None, *, sdcpp: bool = False) -> tuple[str, str]:
    """Resolve a written sampler (+ schedule) to the webui's sampler name and schedule label.

    Handles legacy combined names ("DPM++ 2M Karras" -> "DPM++ 2M", "Karras") and
    stable-diffusion.cpp's ("euler_a karras" -> "Euler a", "Karras"). A schedule folded into
    the sampler name wins over a separate one, as in the webui. Unknown names are kept.
    """
    sampler = sampler.strip()
    label = SCHEDULE_LABELS.get((schedule or "").strip().lower(), (schedule or "").strip())
    words = sampler.split()
    if words and words[0] in SDCPP_SAMPLERS and (
        len(words) == 1 or (len(words) == 2 and words[1] in SDCPP_SCHEDULES)
    ):
        if len(words) == 2:
            return SDCPP_SAMPLERS[words[0]], SDCPP_SCHEDULES[words[1]]
        return SDCPP_SAMPLERS[words[0]], label or ("Uniform" if sdcpp else "Automatic")
    lowered = sampler.lower()
    for suffix in _SUFFIX_ORDER:
        if lowered.endswith(" " + suffix) and len(sampler) > len(suffix) + 1:
            return sampler[: -len(suffix) - 1].rstrip(), _SUFFIXES[suffix]
    return sampler, label or "Automatic"


_KEY_OF_FIELD = {
    "steps": "Steps", "cfg_scale": "CFG scale", "seed": "Seed", "width": "Size width",
    "height": "Size height", "clip_skip": "Clip skip", "eta": "Eta", "eta_noise_seed_delta": "ENSD",
}
# "RNG" values -> randn_source: the webui's three, and stable-diffusion.cpp's "cuda" (its port of the
# webui's Philox, the same numbers as NV). Anything else (sd.cpp's std_default) is not reproducible here.
_RNG_SOURCES = {"cpu": "CPU", "gpu": "GPU", "nv": "NV", "cuda": "NV"}


def randn_source_of(params: Mapping[str, str]) -> str:
    """The noise source an infotext was made with. No "RNG" key means the webui's default, GPU, as the
    webui reads it when pasting (it writes the key only for CPU and NV), except in Darkroom's own
    infotexts ("Version: darkroom-..."): Darkroom's images always carry the key, but an infotext built
    without it (before noise sources existed) was made with Darkroom's default, CPU."""
    raw = params.get("RNG")
    if raw is None:
        return "CPU" if params.get("Version", "").strip().startswith("darkroom-") else "GPU"
    return _RNG_SOURCES.get(raw.strip().lower(), "CPU")


def _number(params: Mapping[str, str], key: str, kind: type[int] | type[float]):
    raw = params[key].strip()
    try:
        return kind(float(raw)) if kind is int and "." in raw else kind(raw)
    except ValueError:
        raise InvalidRequest(f"the infotext's '{key}: {raw}' is not a number") from None


def request_from_infotext(text: str) -> GenerationRequest:
    """Turn an image's infotext back into the request that reproduces it.

    Reads prompt, negative prompt, Steps, Sampler, Schedule type, CFG scale, Seed, Size,
    Clip skip, Eta, Model (falling back to Model hash), Denoising strength, the hires fix's
    keys, variation seeds, RNG (missing: GPU, as in the webui) and ENSD; anything else keeps its
    default (an img2img source image is not in the infotext, so such images rerun as txt2img, as in the webui).
    Raises InvalidRequest when the text has no parameter line or a value is out of range.
    """
    params = parse_infotext(text)
    known = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
    if not any(k in params for k in known):
        raise InvalidRequest(
            "the text has no generation parameters line (the last line should look like"
            " 'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512')"
        )
    sdcpp = params.get("Version", "").strip() == SDCPP_VERSION
    fields: dict[str, object] = {
        "prompt": params["Prompt"], "negative_prompt": params["Negative prompt"],
    }
    if "Steps" in params:
        fields["steps"] = _number(params, "Steps", int)
    if "Sampler" in params:
        sampler, schedule = split_sampler(
            params["Sampler"], params.get("Schedule type"), sdcpp=sdcpp
        )
        fields["sampler"], fields["schedule"] = sampler, schedule
    elif "Schedule type" in params:
        fields["schedule"] = split_sampler("", params["Schedule type"])[1]
    if "CFG scale" in params:
        fields["cfg_scale"] = _number(params, "CFG scale", float)
    if "Seed" in params:
        fields["seed"] = _number(params, "Seed", int)
    if "Size" in params:
        size = _SIZE_RE.match(params["Size"])
        if not size:
            raise InvalidRequest(f"the infotext's 'Size: {params['Size']}' is not WIDTHxHEIGHT")
        fields["width"], fields["height"] = int(size[1]), int(size[2])
    if params.get("Tiling", "").strip().lower() == "true":
        fields["tiling"] = True
    if params.get("Face restoration", "").strip():  # the model is a setting, not part of the request
        fields["restore_faces"] = True
    if "Clip skip" in params:
        fields["clip_skip"] = _number(params, "Clip skip", int)
    for key, name in (("Token merging ratio", "token_merging_ratio"),
                      ("Token merging ratio hr", "token_merging_ratio_hr")):
        if key in params:
            fields[name] = _number(params, key, float)
    if "Eta" in params and not sdcpp:  # sd.cpp's "Eta" is DDIM/TCD eta, not ancestral noise
        fields["eta"] = _number(params, "Eta", float)
    model = params.get("Model", "").strip() or params.get("Model hash", "").strip()
    if model:
        fields["model"] = model
    if "Variation seed" in params:
        fields["subseed"] = _number(params, "Variation seed", int)
        if "Variation seed strength" in params:
            fields["subseed_strength"] = _number(params, "Variation seed strength", float)
    fields["randn_source"] = randn_source_of(params)
    if "ENSD" in params:
        fields["eta_noise_seed_delta"] = _number(params, "ENSD", int)
    if "Denoising strength" in params:
        fields["denoising_strength"] = _number(params, "Denoising strength", float)
    if any(k in params for k in ("Hires upscale", "Hires resize", "Hires upscaler")):
        fields["enable_hr"] = True
        if "Hires upscale" in params:
            fields["hr_scale"] = _number(params, "Hires upscale", float)
        if "Hires resize" in params:
            hr = _SIZE_RE.match(params["Hires resize"])
            if not hr:
                raise InvalidRequest(f"the infotext's 'Hires resize: {params['Hires resize']}' is not WIDTHxHEIGHT")
            fields["hr_resize_x"], fields["hr_resize_y"] = int(hr[1]), int(hr[2])
        if "Hires steps" in params:
            fields["hr_second_pass_steps"] = _number(params, "Hires steps", int)
        if "Hires upscaler" in params:
            fields["hr_upscaler"] = params["Hires upscaler"].strip()
    try:
        return GenerationRequest(**fields)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{_KEY_OF_FIELD.get(str(e['loc'][0]), e['loc'][0])} ({e['msg']})"
            for e in exc.errors() if e["loc"]
        )
        raise InvalidRequest(f"the infotext's values are not usable: {problems}") from None
