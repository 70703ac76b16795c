"""Image metadata: PNG writing, reading PNG/JPEG/WebP from many tools, clear errors."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, PngImagePlugin

from darkroom.errors import DarkroomError
from darkroom.metadata.images import describe, encode_png, read_image_metadata
from darkroom.metadata.infotext import build_infotext, request_from_infotext
from darkroom.request import GenerationRequest

INFOTEXT = (
    "a cat, on a mat\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42,"
    " Size: 64x64, Version: v1.10.1"
)


def _image() -> Image.Image:
    im = Image.new("RGB", (64, 64), (200, 30, 30))
    im.paste((20, 20, 220), (16, 16, 48, 48))
    return im


def _png_with_chunks(chunks: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    out = io.BytesIO()
    _image().save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _with_user_comment(fmt: str, text: str, *, byteorder: str = "utf-16-be") -> bytes:
    """Save as the webui does: EXIF UserComment = b"UNICODE\\0" + UTF-16 text."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = (
        b"UNICODE\0" + text.encode(byteorder)
    )
    out = io.BytesIO()
    _image().save(out, format=fmt, exif=exif.tobytes(), quality=90)
    return out.getvalue()


def test_png_round_trip_latin1_uses_text_chunk():
    data = encode_png(_image(), INFOTEXT)
    assert data.startswith(b"\x89PNG") and b"tEXtparameters" in data and b"iTXt" not in data
    meta = read_image_metadata(data)
    assert meta.parameters == INFOTEXT
    assert meta.source == "a1111" and meta.raw == {"parameters": INFOTEXT}
    assert Image.open(io.BytesIO(data)).convert("RGB").tobytes() == _image().tobytes()


def test_png_round_trip_non_latin1_uses_itxt():
    text = "猫が座っている, ✨\n" + INFOTEXT.split("\n", 1)[1]
    data = encode_png(_image(), text)
    assert b"iTXtparameters" in data and b"tEXt" not in data
    assert read_image_metadata(data).parameters == text


def test_png_encoding_is_deterministic():
    assert encode_png(_image(), INFOTEXT) == encode_png(_image(), INFOTEXT)
    assert b"tIME" not in encode_png(_image(), INFOTEXT)


def test_darkroom_png_round_trips_to_request(tmp_path: Path):
    req = GenerationRequest(prompt="a castle\non a hill, at dusk", negative_prompt="fog: 0.5",
                            sampler="Euler a", schedule="Karras", seed=123, width=64, height=64)
    text = build_infotext(req, seed=123, model_name="v1-5-pruned-emaonly",
                          model_hash="6ce0161689")
    path = tmp_path / "out.png"
    path.write_bytes(encode_png(_image(), text))
    meta = read_image_metadata(path)
    back = request_from_infotext(meta.parameters)
    assert back == req.model_copy(update={"model": "v1-5-pruned-emaonly"})


def test_png_without_metadata(tmp_path: Path):
    path = tmp_path / "plain.png"
    path.write_bytes(encode_png(_image(), None))
    meta = read_image_metadata(str(path))
    assert meta.parameters is None and meta.source == "none" and meta.raw == {}
    message = describe(meta, "plain.png")
    assert message.startswith("plain.png: no generation parameters found (it has no"
                              " 'parameters' text chunk;")
    assert "\n" not in message


def test_png_with_other_text_chunks_lists_them():
    meta = read_image_metadata(_png_with_chunks({"Software": "GIMP 2.10"}))
    assert meta.parameters is None
    assert "other text: Software" in describe(meta, "x.png")


def test_describe_prints_infotext_as_is():
    meta = read_image_metadata(encode_png(_image(), INFOTEXT))
    assert describe(meta, "x.png") == INFOTEXT


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment(fmt: str, tmp_path: Path):
    text = "ünïcode prompt, 猫\n" + INFOTEXT.split("\n", 1)[1]
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_with_user_comment(fmt, text))
    meta = read_image_metadata(path)
    assert meta.parameters == text
    assert meta.source == "a1111"
    assert request_from_infotext(meta.parameters).prompt == "ünïcode prompt, 猫"


def test_exif_user_comment_little_endian():
    meta = read_image_metadata(_with_user_comment("JPEG", INFOTEXT, byteorder="utf-16-le"))
    assert meta.parameters == INFOTEXT


def test_jpeg_without_metadata_says_so():
    out = io.BytesIO()
    _image().save(out, format="JPEG")
    meta = read_image_metadata(out.getvalue())
    assert meta.parameters is None
    assert "no EXIF UserComment in the JPEG file" in describe(meta, "photo.jpg")


def _comfy_graph() -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "SD1.5\\dreamshaper_8.safetensors"}},
        "10": {"class_type": "LoraLoader",
               "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "detail.safetensors",
                          "strength_model": 0.8, "strength_clip": 0.8}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "a lighthouse, stormy sea, 8k", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "blurry, lowres", "clip": ["10", 1]}},
        "11": {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["6", 0]}},
        "12": {"class_type": "PrimitiveNode", "inputs": {"seed": 156680208700286}},
        "3": {"class_type": "KSampler",
              "inputs": {"seed": 1234, "steps": 25, "cfg": 6.5, "sampler_name": "dpmpp_2m",
                         "scheduler": "karras", "denoise": 1.0, "model": ["10", 0],
                         "positive": ["11", 0], "negative": ["7", 0],
                         "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def test_comfyui_png_derives_parameters():
    graph = _comfy_graph()
    workflow = json.dumps({"nodes": [], "links": [], "version": 0.4})
    data = _png_with_chunks({"prompt": json.dumps(graph), "workflow": workflow})
    meta = read_image_metadata(data)
    assert meta.source == "comfyui"
    assert meta.comfyui_prompt == json.dumps(graph) and meta.comfyui_workflow == workflow
    assert meta.parameters == (
        "a lighthouse, stormy sea, 8k\nNegative prompt: blurry, lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234,"
        " Size: 512x768, Model: dreamshaper_8"
    )
    req = request_from_infotext(meta.parameters)
    assert (req.sampler, req.schedule, req.steps, req.seed) == ("DPM++ 2M", "Karras", 25, 1234)


def test_comfyui_linked_seed_and_advanced_sampler():
    graph = _comfy_graph()
    sampler = graph.pop("3")
    sampler["class_type"] = "KSamplerAdvanced"
    inputs = sampler["inputs"]
    inputs.pop("seed")
    inputs.update(noise_seed=["12", 0], sampler_name="euler_ancestral", scheduler="normal",
                  cfg=7)
    graph["3"] = sampler
    meta = read_image_metadata(_png_with_chunks({"prompt": json.dumps(graph)}))
    assert "Sampler: Euler a, Schedule type: Normal, CFG scale: 7, Seed: 156680208700286" in (
        meta.parameters)


def test_comfyui_workflow_only():
    data = _png_with_chunks({"workflow": json.dumps({"nodes": [], "links": []})})
    meta = read_image_metadata(data)
    assert meta.source == "comfyui" and meta.parameters is None
    assert "only the UI 'workflow' graph" in describe(meta, "c.png")


def test_invokeai_metadata():
    meta_json = json.dumps({
        "positive_prompt": "a fox", "negative_prompt": "", "seed": 99, "steps": 30,
        "cfg_scale": 7.5, "width": 768, "height": 512, "scheduler": "dpmpp_2m_k",
        "model": {"name": "juggernaut", "base": "sdxl"},
    })
    meta = read_image_metadata(_png_with_chunks({"invokeai_metadata": meta_json}))
    assert meta.source == "invokeai"
    assert meta.parameters == (
        "a fox\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5,"
        " Seed: 99, Size: 768x512, Model: juggernaut"
    )


def test_fooocus_json_scheme():
    params = json.dumps({
        "prompt": "a city", "negative_prompt": "smog", "resolution": "(1152, 896)",
        "guidance_scale": 4, "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras",
        "seed": "5", "steps": 30, "base_model": "juggernautXL_v8Rundiffusion.safetensors",
    })
    meta = read_image_metadata(_png_with_chunks({"parameters": params,
                                                 "fooocus_scheme": "fooocus"}))
    assert meta.source == "fooocus"
    req = request_from_infotext(meta.parameters)
    assert (req.sampler, req.schedule, req.width, req.height) == (
        "DPM++ 2M SDE", "Karras", 1152, 896)
    assert req.model == "juggernautXL_v8Rundiffusion"


def _assert_clean_error(exc: DarkroomError, name: str, *words: str) -> None:
    message = str(exc)
    assert message.startswith(f"{name}: ")
    for word in words:
        assert word in message
    assert exc.__cause__ is None  # no Pillow exception chained or shown as context
    assert exc.__context__ is None or exc.__suppress_context__


def test_text_file_named_png(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(path)
    _assert_clean_error(info.value, str(path), "not a PNG, JPEG or WebP image", "text file")


def test_truncated_png(tmp_path: Path):
    data = encode_png(_image(), INFOTEXT)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(path)
    _assert_clean_error(info.value, str(path), "PNG file is truncated", "ends inside its")


def test_png_missing_end_marker_is_truncated():
    data = encode_png(_image(), INFOTEXT)
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(data[:-12], name="end.png")
    _assert_clean_error(info.value, "end.png", "truncated", "IEND")


def test_corrupt_png_pixel_data_with_valid_checksums():
    data = bytearray(encode_png(_image(), INFOTEXT))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    data[idat + 6: idat + 14] = b"\xff" * 8
    data[idat + 4 + length: idat + 8 + length] = zlib.crc32(
        data[idat: idat + 4 + length]).to_bytes(4, "big")
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(bytes(data), name="bad.png")
    _assert_clean_error(info.value, "bad.png", "PNG file is corrupt", "cannot be decoded")


def test_corrupt_png_pixel_data_checksum():
    data = bytearray(encode_png(_image(), INFOTEXT))
    idat = data.index(b"IDAT")
    data[idat + 6: idat + 14] = b"\xff" * 8
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(bytes(data), name="bad.png")
    _assert_clean_error(info.value, "bad.png", "corrupt", "'IDAT' chunk fails its checksum")


@pytest.mark.parametrize(("fmt", "cut", "words"), [
    ("JPEG", 0.5, ("JPEG file is truncated",)),
    ("JPEG", 40, ("JPEG file is truncated or corrupt", "header")),
    ("WEBP", 0.5, ("WebP file is truncated or corrupt",)),
])
def test_truncated_jpeg_and_webp(fmt: str, cut: float, words: tuple[str, ...]):
    out = io.BytesIO()
    Image.effect_noise((128, 128), 40).convert("RGB").save(out, format=fmt)
    data = out.getvalue()
    end = int(len(data) * cut) if cut < 1 else int(cut)
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(data[:end], name="cut")
    _assert_clean_error(info.value, "cut", *words)


def test_corrupt_png_chunk_checksum():
    data = bytearray(encode_png(_image(), INFOTEXT))
    data[data.index(b"Steps")] ^= 0x20  # text changed, CRC not
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(bytes(data), name="crc.png")
    _assert_clean_error(info.value, "crc.png", "corrupt", "checksum")


@pytest.mark.parametrize(("content", "words"), [
    (b"", ("empty",)),
    (b"\x00\x01\x02\x03\xfe\xff", ("first bytes",)),
])
def test_not_an_image(content: bytes, words: tuple[str, ...]):
    with pytest.raises(DarkroomError) as info:
        read_image_metadata(content, name="blob")
    _assert_clean_error(info.value, "blob", *words)


def test_missing_file_and_folder(tmp_path: Path):
    with pytest.raises(DarkroomError, match="no such file"):
        read_image_metadata(tmp_path / "nope.png")
    with pytest.raises(DarkroomError, match="is a folder"):
        read_image_metadata(tmp_path)
