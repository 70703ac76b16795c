"""Hypothesis strategies for the fuzz: values, images, request bodies."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

from hypothesis import strategies as st
from PIL import Image

from darkroom.engine.samplers import SAMPLERS, SCHEDULE_NAMES
from darkroom.request import MAX_SEED
from darkroom.services.xyplot import axis_names

# --- strategies: values -----------------------------------------------------------------------------

EDGE_INTS = (0, -1, 1, 2, 3, 7, 8, 63, 64, 65, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
             -(2**63) - 1, 10**40)
EDGE_FLOATS = (0.0, -0.0, 0.5, 1.0, -1.5, 7.5, 1e-308, 5e-324, 1e308, -1e308, float("inf"), float("-inf"),
               float("nan"))
EDGE_TEXT = ("", " ", "0", "-1", "1.5", "None", "null", "true", "Automatic", "1e999", "NaN", "x" * 70_000,
             "a b " * 20_000, "🦊🌊" * 3, "\u202eevil\u202c", "مرحبا بالعالم", "a\x00b", "line\nbreak", "\ud800",
             "\udfff", "\udce9", "((a:1e400))", "[a:b:0.5]", "<lora:missing:1>", "../../etc/passwd", "%s%n{0}",
             "Euler a", "512x512", "64x64", "tiny-sd1", "dall-e-3", "\t")
# characters that matter to parsers (prompt syntax, infotext, CSV, paths) and to encoders
SPECIAL_CHARS = ("\ud800", "\udfff", "\udce9", "\x00", "\u202e", "🦊", "\n", "\r", ",", ":", "(", ")", "[", "]",
                 "|", "<", ">", "=", "\\", '"', "'", "/", " ", "-", "x", "9", ".", "e", "\u0301", "\ufeff")
chars = st.one_of(st.characters(), st.sampled_from(SPECIAL_CHARS))
texts = st.one_of(st.text(chars, max_size=24), st.sampled_from(EDGE_TEXT))
url_texts = st.one_of(st.text(chars, max_size=24), st.sampled_from([t for t in EDGE_TEXT if len(t) < 1000]),
                      st.just("x" * 4000))
"""Text for a URL's path or query (httpx refuses URLs over 64 kB before sending them)."""
clean_texts = st.text(st.one_of(st.characters(), st.sampled_from(SPECIAL_CHARS[3:])), max_size=24)
"""Text that is valid Unicode (no lone surrogates), for the fields that take text."""
ints = st.one_of(st.integers(), st.sampled_from(EDGE_INTS))
floats = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(texts, inner, max_size=4)),
                        max_leaves=10)
"""JSON values of any shape (NaN, infinities and lone surrogates included: see `encode`)."""


def encode(value) -> bytes:
    """JSON as a client may send it: Python's json writes NaN/Infinity and escapes lone surrogates."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")


def one_in(n: int):
    """True one time in `n` (False is what examples shrink to)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def mostly(draw, usual, other, n: int):
    """`usual`, and one time in `n` `other`."""
    return draw(other) if draw(one_in(n)) else draw(usual)


def with_wrong(value_strategy):
    """Mostly a valid value (19 in 20), now and then anything at all."""
    return mostly(value_strategy, anything, 20)


# --- strategies: images -----------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_declaring(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG whose header declares width x height, with `data` (compressed) as its only pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


MAGICS = (PNG_SIGNATURE, b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"GIF89a", b"GIF87a", b"BM", b"II*\x00",
          b"MM\x00*", b"RIFF\x10\x00\x00\x00WEBPVP8 ", b"P6\n", b"P5\n2 2\n255\n", b"\x00\x00\x01\x00", b"8BPS",
          b"\x0a\x05\x01\x08", b"qoif", b"DDS ", b"\x00\x00\x00\x0cjP  ", b"icns", b"%PDF-", b"{}", b"")
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV")
COMFY_CLASSES = ("KSampler", "KSamplerAdvanced", "CLIPTextEncode", "EmptyLatentImage", "CheckpointLoaderSimple",
                 "PrimitiveNode", "VAEDecode", "x")
COMFY_INPUTS = ("seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "model",
                "latent_image", "text", "text_g", "text_l", "width", "height", "ckpt_name", "unet_name", "value")
INFOTEXT_KEYS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Model hash",
                 "Clip skip", "Eta", "Denoising strength", "Hires upscale", "Hires resize", "Hires steps",
                 "Hires upscaler", "Variation seed", "Variation seed strength", "Version", "Lora hashes",
                 "TI hashes", "VAE", "Script", "X Type", "X Values")
INFOTEXT_VALUES = ("1", "3", "0", "-1", "1.5", "1e999", "1.0e999", "nan", "inf", "-0.0", "64x64", "0x0", "64x",
                   "9" * 5000, "9" * 5000 + "x64", "64x" + "9" * 5000, "Euler", "DPM++ 2M Karras", "euler_a karras",
                   "Latent", "bogus", '"quoted, with comma"', '"unterminated', "tiny-sd1", "stable-diffusion.cpp",
                   "darkroom-1.0", "")


INFOTEXT_USUAL = {"Steps": st.sampled_from(("1", "2", "3")), "Sampler": st.sampled_from(("Euler", "Euler a", "DDIM")),
                  "CFG scale": st.sampled_from(("7", "1.5", "0")), "Seed": st.sampled_from(("1", "-1", "42")),
                  "Size": st.sampled_from(("64x64", "72x64", "64x128"))}


@st.composite
def infotexts(draw) -> str:
    """An A1111 infotext: prompt lines, a negative prompt, and a parameter line: mostly the usual keys with
    small values, then known keys with odd values and unknown keys."""
    lines = [draw(prompt_texts)]
    if draw(st.booleans()):
        lines.append("Negative prompt: " + draw(prompt_texts))
    pairs = [(k, draw(v)) for k, v in INFOTEXT_USUAL.items() if not draw(one_in(6))]
    odd_value = st.one_of(st.sampled_from(INFOTEXT_VALUES), texts)
    pairs += draw(st.lists(st.tuples(st.one_of(st.sampled_from(INFOTEXT_KEYS), texts), odd_value), max_size=3))
    lines.append(", ".join(f"{k}: {v}" for k, v in draw(st.permutations(pairs))))
    return draw(st.sampled_from(("\n", "\r\n", "\r"))).join(lines)


@st.composite
def comfy_graphs(draw) -> str:
    """A ComfyUI API graph: nodes whose inputs are literals or links to other (or the same) nodes."""
    ids = [str(i) for i in range(draw(st.integers(1, 6)))]
    link = st.tuples(st.sampled_from([*ids, "99"]), st.integers(0, 2)).map(list)
    value = st.one_of(link, link, st.integers(-2, 2**64), st.floats(), texts, st.none(), anything)
    graph = {i: {"class_type": draw(st.sampled_from(COMFY_CLASSES)),
                 "inputs": draw(st.dictionaries(st.sampled_from(COMFY_INPUTS), value, max_size=8))} for i in ids}
    return json.dumps(graph, allow_nan=True)


TEXT_KEYS = ("parameters", "prompt", "workflow", "invokeai_metadata", "fooocus_scheme", "Comment", "comment",
             "Software", "Description", "sd-metadata")
json_texts = st.one_of(anything.map(lambda v: json.dumps(v, allow_nan=True)), comfy_graphs(),
                       st.fixed_dictionaries({}, optional={k: anything for k in (
                           "steps", "seed", "cfg_scale", "width", "height", "scheduler", "model", "positive_prompt",
                           "negative_prompt", "resolution", "sampler", "guidance_scale", "base_model",
                           "full_prompt", "prompt")}).map(lambda d: json.dumps(d, allow_nan=True)))
text_values = st.one_of(texts, infotexts(), json_texts)


def text_chunk(kind: str, key: bytes, value: str, raw: bytes) -> bytes:
    if kind == "tEXt":
        return chunk(b"tEXt", key + b"\0" + value.encode("latin-1", "replace"))
    if kind == "zTXt":
        return chunk(b"zTXt", key + b"\0\0" + (raw or zlib.compress(value.encode("latin-1", "replace"))))
    return chunk(b"iTXt", key + b"\0\0\0\0\0" + (raw or value.encode("utf-8", "surrogatepass")))


@st.composite
def pngs_with_text(draw) -> bytes:
    """A small valid PNG carrying text chunks of every webui (tEXt, zTXt, iTXt; damaged ones too)."""
    base = encoded(Image.new("RGB", (draw(st.sampled_from((8, 64))), 64), (90, 60, 30)))
    chunks = b""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("tEXt", "zTXt", "iTXt")))
        key = draw(st.one_of(st.sampled_from(TEXT_KEYS).map(str.encode), st.binary(max_size=80)))
        value = draw(text_values)
        raw = draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=40)))
        chunks += text_chunk(kind, key, value, raw)
    at = base.index(b"IDAT") - 4 if draw(st.booleans()) else len(base) - 12  # before IDAT or before IEND
    return base[:at] + chunks + base[at:]


@st.composite
def valid_images(draw) -> bytes:
    """A real image of a random mode, size and format (PNG, JPEG, WebP, GIF, BMP, TIFF)."""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.sampled_from((1, 8, 63, 64, 72, 200))), draw(st.sampled_from((1, 8, 64, 65, 128))))
    image = Image.new(mode, size)
    if draw(st.booleans()):
        image.paste(Image.new(mode, (size[0] // 2 + 1, size[1]), draw(st.integers(0, 255))))
    fmt = draw(st.sampled_from(("PNG", "PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")))
    kw = {}
    if fmt == "JPEG" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.one_of(st.integers(0, 9), st.just(65535)))  # orientation
        kw["exif"] = draw(st.one_of(st.just(exif.tobytes()), st.binary(max_size=64).map(lambda b: b"Exif\0\0" + b)))
    try:
        return encoded(image, fmt, **kw)
    except (OSError, ValueError, KeyError, struct.error):  # a mode the format cannot hold
        return encoded(image.convert("RGB"), "PNG")


IMAGE_64 = encoded(Image.new("RGB", (64, 64), (200, 40, 40)))
TRANSPARENT_64 = encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))

image_bytes = st.one_of(
    st.just(IMAGE_64), st.just(TRANSPARENT_64), valid_images(), pngs_with_text(),
    st.binary(max_size=300),
    st.tuples(st.sampled_from(MAGICS), st.binary(max_size=300)).map(b"".join),
    st.tuples(st.sampled_from((1, 64, 65_535, 100_000, 2**31 - 1, 2**32 - 1, 0)),
              st.sampled_from((1, 64, 100_000, 2**31 - 1, 0))).map(lambda wh: png_declaring(*wh)),
    st.tuples(valid_images(), st.integers(1, 200)).map(lambda t: t[0][: max(1, len(t[0]) - t[1])]),  # truncated
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


good_images = st.one_of(st.just(IMAGE_64), st.just(TRANSPARENT_64), valid_images())
"""Images that decode (any mode, size and format): most examples should get past the decoding."""
some_images = mostly(good_images, image_bytes, 4)


info_images = mostly(pngs_with_text(), image_bytes, 3)
"""Images for PNG info: mostly PNGs with text chunks of every webui."""


@st.composite
def base64_images(draw, images=some_images) -> str:
    """An image as the APIs take it: base64, a data: URL, or something that only looks like one."""
    data = draw(images)
    how = draw(st.sampled_from(("plain", "plain", "plain", "plain", "data", "unpadded", "spaces", "urlsafe", "text")))
    if how == "data":
        return "data:image/png;base64," + b64(data)
    if how == "unpadded":
        return b64(data).rstrip("=")
    if how == "spaces":
        return " ".join(b64(data)[i:i + 7] for i in range(0, len(b64(data)), 7))
    if how == "urlsafe":
        return base64.urlsafe_b64encode(data).decode("ascii")
    if how == "text":
        return draw(texts)
    return b64(data)


# --- strategies: request bodies -------------------------------------------------------------------------

SAMPLER_NAMES = [s.name for s in SAMPLERS] + [a for s in SAMPLERS for a in s.aliases][:6]
samplers_ = with_wrong(st.sampled_from([*SAMPLER_NAMES, "DPM++ 2M Karras", "euler", "bogus"]))
schedules = with_wrong(st.sampled_from([*SCHEDULE_NAMES, "karras", "simple", "bogus"]))
sides = st.sampled_from((64, 64, 64, 72, 128))
PROMPT_BITS = ("a cat", "(red:1.3)", "[blue:green:0.5]", "[a|b]", "((((", "))", "BREAK", "<lora:missing:0.8>",
               "(x:1e400)", "AND", "[a:b:", "\\(", "embedding:none", "🦊")
prompt_texts = st.one_of(st.sampled_from(("a cat", "a red fox in the snow")), clean_texts,
                         st.lists(st.one_of(st.sampled_from(PROMPT_BITS), clean_texts), max_size=5).map(" ".join),
                         texts)
prompts = with_wrong(prompt_texts)
MODEL_NAMES = ("tiny-sd1", "tiny-sd1.safetensors", "TINY-SD1", "nope", "", "../tiny-sd1", "/etc/passwd",
               "tiny-sd1 [0123456789]", "0123456789", "Automatic", "None")
models_ = with_wrong(st.sampled_from(MODEL_NAMES))
AXIS_VALUES = ("1-3", "1,2", "3-1 (-1)", "1-3 [2]", "1-2 (+0.5)", "0.5-1 [2]", "1-1000000", "1-3 (+0)", "1-3 [0]",
               "1-" + "9" * 5000, "0-1" + "0" * 400, "0.0-1" + "0" * 400 + ".0 [3]", "1-" + "9" * 400 + " (+1)",
               "Euler,DDIM", "Euler,bogus", "64x64,72x64", "64x" + "9" * 5000, "a,b", "cat,dog", '"unterminated',
               "nan,inf", "-1,-1", "Latent,Lanczos", "tiny-sd1", "")
numbers = st.one_of(st.integers(-3, 130), st.sampled_from(EDGE_INTS), st.floats(-2, 20).map(lambda f: round(f, 2)),
                    st.sampled_from(EDGE_FLOATS), st.sampled_from(("9" * 5000, "1" + "0" * 400, "1e5", " 2 ")))
axis_values = st.one_of(
    st.sampled_from(AXIS_VALUES),
    st.tuples(numbers, numbers, numbers).map(lambda t: "{}-{} (+{})".format(*t)),
    st.tuples(numbers, numbers, numbers).map(lambda t: "{}-{} [{}]".format(*t)),
    st.tuples(numbers, numbers).map(lambda t: "{}-{}".format(*t)),
    st.lists(numbers, min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))),
    st.lists(st.one_of(st.sampled_from((*SAMPLER_NAMES, *SCHEDULE_NAMES, "64x64", "72x64", "tiny-sd1")), texts),
             min_size=1, max_size=3).map(",".join),
    texts)
axes = st.one_of(
    st.tuples(st.one_of(st.sampled_from(axis_names()), st.sampled_from(("steps", "cfg", "seed", "w", "size", "sr"))),
              axis_values).map(lambda t: f"{t[0]}={t[1]}"),
    st.tuples(texts, axis_values).map(lambda t: f"{t[0]}={t[1]}"), texts, st.none())


@st.composite
def bodies(draw, core: dict, optional: dict, *, unknown: bool = True) -> dict:
    """A request body: the `core` fields (small valid values, so valid requests run cheaply), some
    `optional` ones, then a few fields (known or not) set to anything at all."""
    body = {k: draw(s) for k, s in core.items() if draw(one_in(20)) is False}  # each core field mostly present
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=6)):
        body[key] = draw(optional[key])
    names = sorted({*core, *optional})
    for _ in range(draw(st.sampled_from((0, 0, 0, 0, 1, 1, 2)))):
        key = draw(st.one_of(st.sampled_from(names), texts) if unknown else st.sampled_from(names))
        body[key] = draw(st.one_of(anything, st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS),
                                   st.sampled_from(EDGE_TEXT)))
    return body


def any_body(structured):
    """Mostly structured bodies (7 in 8), sometimes JSON of a random shape."""
    return mostly(structured, anything, 8)


GENERATION_FIELDS = {
    "negative_prompt": prompts, "schedule": schedules, "cfg_scale": with_wrong(st.floats(0, 30)),
    "seed": with_wrong(st.one_of(st.integers(-1, 10), st.sampled_from((MAX_SEED, MAX_SEED - 1, 2**63)))),
    "batch_size": with_wrong(st.integers(1, 2)), "n_iter": with_wrong(st.integers(1, 2)),
    "clip_skip": with_wrong(st.integers(1, 12)), "model": models_,
    "eta": with_wrong(st.one_of(st.none(), st.floats(0, 1))), "subseed": with_wrong(st.integers(-1, 5)),
    "subseed_strength": with_wrong(st.floats(0, 1)),
    "vae": with_wrong(st.sampled_from((None, "Automatic", "None", "nope", "../x.safetensors"))),
    "denoising_strength": with_wrong(st.floats(0, 1)), "resize_mode": with_wrong(st.integers(0, 2)),
    "mask_blur": with_wrong(st.integers(0, 64)), "inpainting_fill": with_wrong(st.integers(0, 3)),
    "inpaint_full_res": with_wrong(st.booleans()), "inpaint_full_res_padding": with_wrong(st.integers(0, 256)),
    "inpainting_mask_invert": with_wrong(st.booleans()), "enable_hr": with_wrong(st.booleans()),
    "hr_scale": with_wrong(st.floats(1, 2)),
    "hr_upscaler": with_wrong(st.sampled_from(("Latent", "Latent (nearest)", "Lanczos", "Nearest", "None", "x"))),
    "hr_second_pass_steps": with_wrong(st.integers(0, 3)), "hr_resize_x": with_wrong(st.sampled_from((0, 64, 128))),
    "hr_resize_y": with_wrong(st.sampled_from((0, 64, 128))),
}
NATIVE_CORE = {"prompt": prompts, "steps": st.integers(1, 3), "width": sides, "height": sides,
               "sampler": samplers_}
NATIVE_OPTIONAL = {**GENERATION_FIELDS, "private": with_wrong(st.booleans()),
                   "init_image": with_wrong(base64_images()), "mask": with_wrong(base64_images()),
                   "xy": with_wrong(st.fixed_dictionaries({}, optional={"x": axes, "y": axes}))}

OVERRIDES = st.dictionaries(
    st.one_of(st.sampled_from(("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "eta_noise_seed_delta",
                               "randn_source", "samples_format", "sd_checkpoint_hash", "darkroom_max_side",
                               "darkroom_max_batch_size", "darkroom_max_batch_count", "darkroom_max_steps")), texts),
    st.one_of(st.sampled_from((1, 2, 12, 13, 0, "2", "tiny-sd1", "nope", "Automatic", "None", "CPU", "GPU", "png",
                               "jpg", None, 1.5, float("inf"), float("nan"), 2**64)), anything), max_size=3)
A1111_CORE = {"prompt": prompts, "steps": st.integers(1, 3), "width": sides, "height": sides,
              "sampler_name": samplers_}
A1111_OPTIONAL = {
    "negative_prompt": prompts, "styles": with_wrong(st.lists(texts, max_size=2)),
    "seed": GENERATION_FIELDS["seed"], "subseed": GENERATION_FIELDS["subseed"],
    "subseed_strength": GENERATION_FIELDS["subseed_strength"],
    "seed_resize_from_h": with_wrong(st.sampled_from((-1, 0, 64))),
    "seed_resize_from_w": with_wrong(st.sampled_from((-1, 0, 64))), "sampler_index": samplers_,
    "scheduler": schedules, "batch_size": GENERATION_FIELDS["batch_size"], "n_iter": GENERATION_FIELDS["n_iter"],
    "cfg_scale": GENERATION_FIELDS["cfg_scale"], "restore_faces": with_wrong(st.sampled_from((None, False, True))),
    "tiling": with_wrong(st.sampled_from((None, False, True))), "do_not_save_samples": with_wrong(st.booleans()),
    "eta": GENERATION_FIELDS["eta"], "denoising_strength": GENERATION_FIELDS["denoising_strength"],
    "s_churn": with_wrong(st.sampled_from((None, 0, 1))), "s_noise": with_wrong(st.sampled_from((None, 1, 0.5))),
    "s_tmax": floats, "s_tmin": floats, "s_min_uncond": floats, "refiner_switch_at": floats,
    "override_settings": with_wrong(OVERRIDES), "override_settings_restore_afterwards": with_wrong(st.booleans()),
    "refiner_checkpoint": with_wrong(st.sampled_from((None, "", "None", "tiny-sd1"))),
    "comments": with_wrong(st.dictionaries(texts, anything, max_size=2)), "force_task_id": texts,
    "script_name": with_wrong(st.sampled_from((None, "", "None", "x/y/z plot"))), "script_args": anything,
    "send_images": with_wrong(st.booleans()), "save_images": with_wrong(st.booleans()),
    "alwayson_scripts": with_wrong(st.sampled_from(({}, {"controlnet": {"args": []}}))),
    "infotext": with_wrong(st.one_of(st.none(), infotexts())),
}
TXT2IMG_OPTIONAL = {
    **A1111_OPTIONAL, "enable_hr": with_wrong(st.booleans()), "hr_scale": GENERATION_FIELDS["hr_scale"],
    "hr_upscaler": with_wrong(st.sampled_from((None, "", "None", "Latent", "Lanczos", "Latent (bicubic)", "ESRGAN"))),
    "hr_second_pass_steps": GENERATION_FIELDS["hr_second_pass_steps"], "hr_resize_x": GENERATION_FIELDS["hr_resize_x"],
    "hr_resize_y": GENERATION_FIELDS["hr_resize_y"], "firstphase_width": with_wrong(st.sampled_from((0, 64))),
    "hr_checkpoint_name": models_, "hr_sampler_name": samplers_, "hr_scheduler": schedules,
    "hr_prompt": prompts, "hr_negative_prompt": prompts,
}
IMG2IMG_CORE = {**A1111_CORE, "init_images": with_wrong(st.lists(base64_images(), min_size=1, max_size=2))}
IMG2IMG_OPTIONAL = {
    **A1111_OPTIONAL, "mask": with_wrong(st.one_of(st.none(), base64_images())),
    "mask_blur": with_wrong(st.sampled_from((None, 0, 4, 64, 65))), "mask_blur_x": with_wrong(st.integers(0, 8)),
    "resize_mode": with_wrong(st.integers(0, 3)), "inpainting_fill": with_wrong(st.integers(0, 4)),
    "inpaint_full_res": with_wrong(st.booleans()), "inpaint_full_res_padding": with_wrong(st.integers(0, 64)),
    "inpainting_mask_invert": with_wrong(st.integers(0, 2)), "include_init_images": with_wrong(st.booleans()),
    "initial_noise_multiplier": with_wrong(st.sampled_from((None, 1, 0.5))), "image_cfg_scale": floats,
    "latent_mask": with_wrong(st.one_of(st.none(), base64_images())), "mask_round": with_wrong(st.booleans()),
}

OPENAI_SIZES = ("64x64", "72x64", " 64 x 128 ", "auto", "", "0x0", "64", "64x64x64", "99999999999999999999x64",
                "-64x64", "６４x64", "1024x1024", "65x64", "x")
OPENAI_CORE = {"prompt": st.one_of(st.sampled_from(("a cat", "a red fox in the snow")), prompts),
               "steps": st.integers(1, 3), "size": with_wrong(st.sampled_from(OPENAI_SIZES)),
               "sampler": samplers_}
OPENAI_OPTIONAL = {
    "model": with_wrong(st.sampled_from((None, "dall-e-3", "dall-e-2", *MODEL_NAMES))),
    "n": with_wrong(st.integers(1, 2)), "response_format": with_wrong(st.sampled_from(("b64_json", "url", "URL"))),
    "quality": texts, "style": texts, "user": texts, "negative_prompt": prompts, "seed": GENERATION_FIELDS["seed"],
    "cfg_scale": GENERATION_FIELDS["cfg_scale"], "schedule": schedules,
}
EDIT_OPTIONAL = {**OPENAI_OPTIONAL, "strength": with_wrong(st.floats(0, 1)),
                 "denoising_strength": with_wrong(st.floats(0, 1)),
                 "inpainting_fill": with_wrong(st.integers(0, 3)), "mask_blur": with_wrong(st.integers(0, 64))}
