"""Generation metadata inside image files: write Darkroom PNGs, read anyone's images.

Writing: one `parameters` text chunk holding the A1111 infotext, which CivitAI, the webui's
PNG Info tab and most tools read. Reading: PNG text chunks (A1111, Forge, sd.cpp, Fooocus,
InvokeAI, ComfyUI) and the EXIF UserComment that the webui writes into JPEG and WebP files.
For ComfyUI, which stores only its node graph, an A1111-style text is derived best-effort
so `png-info` and "reuse these settings" work on those images too.
"""

from __future__ import annotations

import codecs
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from darkroom.errors import DarkroomError
from darkroom.fsutil import read_regular
from darkroom.metadata.infotext import SCHEDULE_LABELS, format_infotext, parse_infotext

MAX_IMAGE_FILE_BYTES = 256 << 20
"""The largest image file read from disk: a 16k x 16k PNG fits; a mistaken multi-GB file is refused."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}

# ComfyUI (and Fooocus, which uses ComfyUI's samplers) names -> the webui's names.
COMFY_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_gpu": "DPM++ 3M SDE", "ddim": "DDIM",
    "uni_pc": "UniPC", "uni_pc_bh2": "UniPC", "lcm": "LCM", "ipndm": "iPNDM",
    "ipndm_v": "iPNDM_v", "deis": "DEIS", "restart": "Restart",
}
COMFY_SCHEDULES = {**SCHEDULE_LABELS, "ddim_uniform": "DDIM"}
# InvokeAI scheduler names; a "_k" suffix means Karras sigmas.
INVOKE_SAMPLERS = {
    "ddim": "DDIM", "lms": "LMS", "heun": "Heun", "euler": "Euler", "euler_a": "Euler a",
    "kdpm_2": "DPM2", "kdpm_2_a": "DPM2 a", "dpmpp_2s": "DPM++ 2S a", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "unipc": "UniPC", "lcm": "LCM",
    "deis": "DEIS",
}


@dataclass
class ImageMetadata:
    """What an image says about how it was made.

    `parameters` is an A1111-layout infotext (written by A1111, Forge, sd.cpp, Darkroom, or
    derived here from a ComfyUI/InvokeAI/Fooocus record); `source` names the layout found:
    "a1111", "comfyui", "invokeai", "fooocus", "novelai" or "none"; `raw` holds every text
    chunk as stored (for JPEG/WebP: the decoded EXIF UserComment and the COM comment).
    """

    parameters: str | None = None
    source: str = "none"
    raw: dict[str, str] = field(default_factory=dict)
    comfyui_prompt: str | None = None
    comfyui_workflow: str | None = None
    image_format: str = ""


def encode_png(image: Image.Image, infotext: str | None, chunks: dict[str, str] | None = None) -> bytes:
    """Encode `image` as PNG with the infotext in a `parameters` chunk.

    tEXt when the text is latin-1, else iTXt (UTF-8). Nothing time-dependent is written, so
    the same pixels and text always give the same bytes (cacheable, testable). `chunks` are more
    text chunks, compressed (zTXt), after it: e.g. ControlNet maps (darkroom.metadata.control_maps).
    """
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)  # Pillow switches to iTXt when not latin-1
    for key, text in (chunks or {}).items():
        info.add_text(key, text, zip=True)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=6)
    return out.getvalue()


SUFFIXES = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
"""The webui's samples_format values and the file suffix each is saved with."""


def encode_file(image: Image.Image, infotext: str | None, fmt: str = "png", *, quality: int = 80,
                 lossless: bool = False) -> bytes:
    """Encode as PNG, JPEG or WebP with the infotext where the webui puts it, so every reader finds it.

    PNG: the `parameters` chunk (encode_png). JPEG and WebP: the EXIF UserComment, "UNICODE\\0" then
    UTF-16 big-endian, as the webui writes it with piexif's UserComment.dump(encoding="unicode").
    """
    fmt = fmt.lower()
    if fmt == "png":
        return encode_png(image, infotext)
    if fmt not in SUFFIXES:
        raise DarkroomError(f"image format {fmt!r} is not one of {', '.join(SUFFIXES)}")
    exif = Image.Exif()
    if infotext is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + infotext.encode("utf-16-be")
    out = io.BytesIO()
    rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    if fmt == "webp":
        rgb.save(out, format="WEBP", exif=exif, quality=quality, lossless=lossless)
    else:
        rgb.save(out, format="JPEG", exif=exif, quality=quality)
    return out.getvalue()


def _sniff(data: bytes) -> str:
    """Say what a non-image looks like, for the error message."""
    if not data:
        return "the file is empty"
    head = data[:512]
    text = codecs.getincrementaldecoder("utf-8")()
    try:
        text.decode(head)
    except UnicodeDecodeError:
        return f"its first bytes are {data[:8].hex(' ')}"
    if all(b >= 32 or b in b"\t\n\r" for b in head):
        return "it looks like a text file"
    return f"its first bytes are {data[:8].hex(' ')}"


def _png_problem(data: bytes) -> str | None:
    """Walk the PNG chunks to say precisely what is wrong: where it ends, which checksum."""
    pos = len(_PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            return f"truncated: it ends inside a chunk header at byte {len(data)}"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if not kind.isalpha() or length > 2**31 - 1:
            return f"corrupt: a damaged chunk header at byte {pos}"
        if end > len(data):
            return (f"truncated: it ends inside its '{name}' chunk (at byte {len(data)}; the"
                    f" chunk runs to byte {end})")
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"corrupt: its '{name}' chunk fails its checksum"
        if kind == b"IEND":
            return None
        pos = end
    return "truncated: it has no IEND end chunk"


def _signature_format(data: bytes) -> str | None:
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _fail(name: str, problem: str) -> DarkroomError:
    return DarkroomError(f"{name}: {problem}", hint="re-export or re-download the image")


def _open(data: bytes, name: str) -> Image.Image:
    """Open and fully decode, so truncated or damaged files fail here with a clear message."""
    if data.startswith(_PNG_SIGNATURE) and (problem := _png_problem(data)):
        raise _fail(name, f"the PNG file is {problem}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DarkroomError(f"{name}: the image is too large to open safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        fmt = _signature_format(data)
        if fmt:
            raise _fail(name, f"the {fmt} file is truncated or corrupt: its header cannot be"
                              " read") from None
        raise DarkroomError(
            f"{name}: not a PNG, JPEG or WebP image ({_sniff(data)})") from None
    fmt = _FORMATS.get(image.format or "", image.format or "image")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncat" in str(exc).lower():
            raise _fail(name, f"the {fmt} file is truncated: its image data ends early") from None
        raise _fail(name, f"the {fmt} file is corrupt: its image data cannot be decoded"
                          f" ({exc})") from None
    return image


def _decode_user_comment(value: Any) -> str | None:
    """Decode EXIF UserComment: an 8-byte charset prefix, then the text.

    The webui (piexif) writes "UNICODE\\0" + UTF-16 big-endian; some tools write
    little-endian, so the byte order is guessed from where the zero bytes fall.
    """
    if isinstance(value, str):
        return value.rstrip("\0") or None
    if not isinstance(value, bytes) or not value:
        return None
    prefix, body = value[:8], value[8:]
    if prefix == b"UNICODE\0":
        little = body[1::2].count(0) > body[0::2].count(0)
        text = body.decode("utf-16-le" if little else "utf-16-be", "replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", "replace")
    else:
        text = value.decode("utf-8", "replace")
    return text.rstrip("\0").strip() or None


def _exif_comment(image: Image.Image) -> str | None:
    try:
        exif_ifd = image.getexif().get_ifd(ExifTags.IFD.Exif)
    except Exception:  # malformed EXIF should not hide the pixels' other metadata
        return None
    return _decode_user_comment(exif_ifd.get(ExifTags.Base.UserComment))


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes ("[[[[...")
        return None


def _link(graph: dict, value: Any) -> dict | None:
    """The node a ComfyUI input links to (`["id", output]`), or None for a literal."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)):
        node = graph.get(str(value[0]))
        return node if isinstance(node, dict) else None
    return None


def _literal(graph: dict, value: Any, kinds: tuple[type, ...], depth: int = 0,
             seen: dict[int, int] | None = None) -> Any:
    """A literal input, following links to primitive nodes (seed/string/number widgets).

    Depth-first, at most 8 links deep, and each node is searched once (`seen`: node -> the
    shallowest depth it was searched from): a node whose inputs all link to one another would
    otherwise be searched (inputs per node) ** 8 times, hours for a graph of a few hundred bytes.
    In a ComfyUI graph (links never form a loop) the first literal found is the same either way.
    """
    if isinstance(value, kinds) and not isinstance(value, bool):
        return value
    node = _link(graph, value)
    if node is None or depth > 8:
        return None
    seen = {} if seen is None else seen
    if seen.get(id(node), depth + 1) <= depth:
        return None  # already searched with at least as many links to go, and nothing found
    seen[id(node)] = depth
    for v in (node.get("inputs") or {}).values():
        found = _literal(graph, v, kinds, depth + 1, seen)
        if found is not None:
            return found
    return None


def _upstream(graph: dict, start: Any, want) -> dict | None:
    """Breadth-first walk from a link to the first node for which `want(node)` holds."""
    queue, seen = [start], set()
    while queue:
        link = queue.pop(0)
        node = _link(graph, link)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if want(node):
            return node
        queue.extend(v for v in (node.get("inputs") or {}).values() if _link(graph, v))
    return None


def _prompt_text(graph: dict, start: Any) -> str:
    def is_encoder(node: dict) -> bool:
        inputs = node.get("inputs") or {}
        return "CLIPTextEncode" in str(node.get("class_type")) and any(
            k in inputs for k in ("text", "text_g", "text_l"))

    node = _upstream(graph, start, is_encoder)
    if node is None:
        return ""
    inputs = node["inputs"]
    for key in ("text", "text_g", "text_l"):
        text = _literal(graph, inputs.get(key), (str,))
        if text:
            return text
    return ""


def _sampler_names(sampler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    return COMFY_SAMPLERS.get(sampler or "", sampler), COMFY_SCHEDULES.get(schedule or "", schedule)


def _model_name(name: Any) -> str | None:
    """A1111's "Model" is the checkpoint file name without folder or extension."""
    if not isinstance(name, str) or not name:
        return None
    return PurePosixPath(name.replace("\\", "/")).stem


def comfyui_parameters(prompt_json: str) -> str | None:
    """Derive an A1111-style infotext from a ComfyUI API-format graph, best-effort.

    Uses the first KSampler (preferring one fed by an empty latent, i.e. the base pass):
    its seed/steps/cfg/sampler/scheduler, the CLIPTextEncode texts its positive and negative
    inputs lead to, the empty latent's size and the checkpoint loader's file name.
    """
    graph = _json(prompt_json)
    if not isinstance(graph, dict):
        return None
    graph = {str(k): v for k, v in graph.items() if isinstance(v, dict)}
    samplers = [n for _, n in sorted(graph.items(), key=lambda kv: (len(kv[0]), kv[0]))
                if str(n.get("class_type", "")).startswith("KSampler")]
    if not samplers:
        return None

    def has_size(node: dict) -> bool:
        inputs = node.get("inputs") or {}
        return "width" in inputs and "height" in inputs

    def from_empty_latent(node: dict) -> bool:
        latent = _link(graph, (node.get("inputs") or {}).get("latent_image")) or {}
        return str(latent.get("class_type", "")).startswith("Empty")

    node = ([n for n in samplers if from_empty_latent(n)] or samplers)[0]
    inputs = node.get("inputs") or {}
    latent = _upstream(graph, inputs.get("latent_image"), has_size)
    loader = _upstream(graph, inputs.get("model"),
                       lambda n: "ckpt_name" in (n.get("inputs") or {})
                       or "unet_name" in (n.get("inputs") or {}))
    sampler, schedule = _sampler_names(
        _literal(graph, inputs.get("sampler_name"), (str,)),
        _literal(graph, inputs.get("scheduler"), (str,)))
    li = latent["inputs"] if latent else {}
    w, h = _literal(graph, li.get("width"), (int,)), _literal(graph, li.get("height"), (int,))
    li = loader["inputs"] if loader else {}
    ckpt = _literal(graph, li.get("ckpt_name", li.get("unet_name")), (str,))
    params = {
        "Steps": _literal(graph, inputs.get("steps"), (int,)), "Sampler": sampler,
        "Schedule type": schedule, "CFG scale": _literal(graph, inputs.get("cfg"), (int, float)),
        "Seed": _literal(graph, inputs.get("seed", inputs.get("noise_seed")), (int,)),
        "Size": f"{w}x{h}" if w and h else None, "Model": _model_name(ckpt),
    }
    return format_infotext(_prompt_text(graph, inputs.get("positive")),
                           _prompt_text(graph, inputs.get("negative")), params)


def invokeai_parameters(metadata_json: str) -> str | None:
    """Derive an A1111-style infotext from InvokeAI's `invokeai_metadata` JSON."""
    meta = _json(metadata_json)
    if not isinstance(meta, dict):
        return None
    scheduler = str(meta.get("scheduler") or "")
    karras = scheduler.endswith("_k")
    sampler = INVOKE_SAMPLERS.get(scheduler.removesuffix("_k"), scheduler or None)
    model = meta.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    w, h = meta.get("width"), meta.get("height")
    params = {
        "Steps": meta.get("steps"), "Sampler": sampler,
        "Schedule type": "Karras" if karras else None, "CFG scale": meta.get("cfg_scale"),
        "Seed": meta.get("seed"), "Size": f"{w}x{h}" if w and h else None,
        "Model": name if isinstance(name, str) else None,
    }
    return format_infotext(str(meta.get("positive_prompt") or ""),
                           str(meta.get("negative_prompt") or ""), params)


def fooocus_parameters(parameters_json: str) -> str | None:
    """Derive an A1111-style infotext from Fooocus's own (JSON) metadata scheme."""
    meta = _json(parameters_json)
    if not isinstance(meta, dict):
        return None
    sampler, schedule = _sampler_names(meta.get("sampler"), meta.get("scheduler"))
    resolution = str(meta.get("resolution") or "").strip("()[] ").replace(" ", "")
    w, _, h = resolution.partition(",")
    params = {
        "Steps": meta.get("steps"), "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": meta.get("guidance_scale"), "Seed": meta.get("seed"),
        "Size": f"{w}x{h}" if w.isdigit() and h.isdigit() else None,
        "Model": _model_name(meta.get("base_model")),
    }
    return format_infotext(str(meta.get("full_prompt") or meta.get("prompt") or ""),
                           str(meta.get("negative_prompt") or ""), params)


def _interpret(raw: dict[str, str], exif_comment: str | None, fmt: str) -> ImageMetadata:
    meta = ImageMetadata(raw=raw, image_format=fmt)
    comfy_prompt, comfy_workflow = raw.get("prompt"), raw.get("workflow")
    if isinstance(_json(comfy_prompt), dict) or isinstance(_json(comfy_workflow), dict):
        meta.comfyui_prompt, meta.comfyui_workflow = comfy_prompt, comfy_workflow
    parameters = raw.get("parameters")
    for comment in (exif_comment, raw.get("comment"), raw.get("Comment")):
        # Other places hold any kind of comment: take them only if they parse as infotext.
        if not parameters and comment and len(parse_infotext(comment)) > 2:
            parameters = comment
    if "fooocus_scheme" in raw:
        meta.source = "fooocus"
        if parameters and isinstance(_json(parameters), dict):
            parameters = fooocus_parameters(parameters)
    elif meta.comfyui_prompt or meta.comfyui_workflow:
        meta.source = "comfyui"  # some ComfyUI save nodes also write an A1111 text: keep it
        if not parameters and meta.comfyui_prompt:
            parameters = comfyui_parameters(meta.comfyui_prompt)
    elif "invokeai_metadata" in raw:
        meta.source = "invokeai"
        parameters = parameters or invokeai_parameters(raw["invokeai_metadata"])
    elif parameters:
        meta.source = "a1111"
    elif raw.get("Software", "").startswith("NovelAI"):
        meta.source = "novelai"
    meta.parameters = parameters or None
    return meta


def read_image_metadata(
    path_or_bytes: str | Path | bytes, *, name: str | None = None
) -> ImageMetadata:
    """Read the generation metadata of a PNG, JPEG or WebP file (path or file bytes).

    Raises DarkroomError, naming the file (or `name`), for a missing file, a non-image, or
    a truncated or corrupt image, instead of letting Pillow's exception through.
    """
    if isinstance(path_or_bytes, bytes):
        data, label = path_or_bytes, name or "image"
    else:
        label = name or str(path_or_bytes)
        try:
            data = read_regular(path_or_bytes, what="an image file", limit=MAX_IMAGE_FILE_BYTES)
        except FileNotFoundError:
            raise DarkroomError(f"{label}: no such file") from None
        except IsADirectoryError:
            raise DarkroomError(f"{label}: is a folder, not an image file") from None
        except OSError as exc:
            raise DarkroomError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    image = _open(data, label)
    fmt = _FORMATS.get(image.format or "", image.format or "")
    raw: dict[str, str] = {}
    text_chunks = getattr(image, "text", None)  # PNG only; includes chunks after IDAT
    if isinstance(text_chunks, dict):
        raw.update({str(k): str(v) for k, v in text_chunks.items()})
    comment = image.info.get("comment")  # JPEG COM marker
    if isinstance(comment, bytes):
        raw.setdefault("comment", comment.decode("utf-8", "replace"))
    exif_comment = _exif_comment(image)
    if exif_comment is not None:
        raw.setdefault("UserComment", exif_comment)
    return _interpret(raw, exif_comment, fmt)


def describe(meta: ImageMetadata, name: str) -> str:
    """Text for `darkroom png-info FILE`: the infotext, or one sentence saying why none."""
    if meta.parameters:
        return meta.parameters
    if meta.source == "comfyui":
        why = ("no KSampler node in its 'prompt' graph to read settings from"
               if meta.comfyui_prompt else
               "only the UI 'workflow' graph, not the 'prompt' graph Darkroom reads settings"
               " from")
        return f"{name}: no generation parameters found (it is a ComfyUI image with {why})"
    if meta.source != "none":
        return (f"{name}: no generation parameters found (it has {meta.source} metadata that"
                " Darkroom cannot read)")
    where = ("no 'parameters' text chunk" if meta.image_format in ("PNG", "")
             else f"no EXIF UserComment in the {meta.image_format} file")
    others = f"; other text: {', '.join(sorted(meta.raw))}" if meta.raw else ""
    return (f"{name}: no generation parameters found (it has {where}; the program that saved"
            f" it did not write any, or an editor or website removed them{others})")
