"""Preparing a request's ControlNet units once: model, control map at each pass's size, infotext.

For each active unit: resolve and load its ControlNet (checked against the checkpoint's family; a
reference unit has none, darkroom.control.reference), take its image (or, as the extension does,
the img2img source when it has none), run its preprocessor (darkroom.control.preprocess), fit the map
to the generation size with its resize mode, and to the hires size when the hires fix is on. Maps are
rounded to 8 bits first, so the copy stored in the PNG (darkroom.metadata.control_maps) reruns the generation exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from darkroom.control.apply import Control, ControlUnitRun
from darkroom.control.files import ControlNetFile, resolve
from darkroom.control.load import ControlNetCache, check_family
from darkroom.control.union import union_index
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.metadata.control_maps import format_unit, map_chunks, quantize_map

Decode = Callable[[bytes, str, str], Image.Image]
"""(file bytes, name for errors, PIL mode) -> image: the engine's checked decoder."""
Encode = Callable[[torch.Tensor], torch.Tensor]
"""pixels [1, 3, H, W] in -1..1 -> scaled latents: the engine's VAE encoding, as for an init image."""


@dataclass
class PreparedControl:
    """What generation needs from the units: the Control for sampling, infotext entries and the maps."""

    control: Control | None
    infotext: dict[str, str] = field(default_factory=dict)  # "ControlNet N" -> the extension's line
    maps: dict[int, np.ndarray] = field(default_factory=dict)  # unit number -> first-pass map (HxWx3)
    hr_maps: dict[int, np.ndarray] = field(default_factory=dict)
    restores: list = field(default_factory=list)  # inpaint_only units' paste-backs (inpaint_only.RestoreImage)

    def restore(self, image: Image.Image) -> Image.Image:
        """A decoded image with each inpaint_only unit's picture put back outside its mask (inpaint_only)."""
        if not self.restores:
            return image
        from darkroom.control.inpaint_only import restore

        return restore(image, self.restores)

    def first_pass(self, hires_enabled: bool) -> Control | None:
        return self.control.for_first_pass(hires_enabled) if self.control else None

    def hires_pass(self) -> Control | None:
        return self.control.for_hires() if self.control else None

    def chunks(self) -> dict[str, str]:
        """PNG text chunks holding the first-pass maps (darkroom.metadata.control_maps)."""
        return map_chunks(self.maps)


def _preprocess():
    from darkroom.control import preprocess

    return preprocess


def fit_map(control: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """The map at exactly height x width with the unit's resize mode (the extension's rules, in preprocess)."""
    return _preprocess().fit(control, width, height, resize_mode)


def _resolution(unit: ControlUnit, module: str, image: Image.Image, width: int, height: int) -> int:
    if unit.pixel_perfect:
        return int(_preprocess().pixel_perfect_resolution(image.width, image.height, width, height,
                                                          unit.resize_mode))
    return unit.processor_res if unit.processor_res > 0 else int(_preprocess().MODULES[module].resolution.value)


def to_hint(control: np.ndarray) -> torch.Tensor:
    """HxWx3 map -> [1, 3, H, W] float32 (values as they are: [0, 1], -1 masked)."""
    return torch.from_numpy(np.ascontiguousarray(control, dtype=np.float32)).permute(2, 0, 1)[None]


def crop_to_region(image: Image.Image, crop: tuple[tuple[int, int, int, int], tuple[int, int]] | None) -> Image.Image:
    """The part of `image` under an "only masked" inpainting crop (box in the init image's pixels, the init
    image's size), scaled to `image`'s own size: a unit's picture then lines up with what is sampled."""
    if crop is None:
        return image
    (x1, y1, x2, y2), (w, h) = crop
    sx, sy = image.width / w, image.height / h
    return image.crop((round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)))


def unit_image(unit: ControlUnit, index: int, decode: Decode, init_image: Image.Image | None,
               init_mask: Image.Image | None, crop=None) -> tuple[Image.Image, Image.Image | None]:
    """The unit's picture and mask: its own (cropped like the init image for "only masked" inpainting, as the
    extension does), else the img2img source and mask (the extension's fallback)."""
    if unit.image is not None:
        # RGBA: a transparent drawing is put on white by the preprocessor (the extension's HWC3 rule)
        image = decode(unit.image, f"ControlNet unit {index} image", "RGBA")
        mask = decode(unit.mask, f"ControlNet unit {index} mask", "L") if unit.mask is not None else None
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.NEAREST)
        image = crop_to_region(image, crop)
        return image, (crop_to_region(mask, crop) if mask is not None else None)
    if init_image is None:
        raise InvalidRequest(f"ControlNet unit {index} has no image; give it one (txt2img has no init image"
                             " to fall back on)")
    mask = init_mask
    if unit.mask is not None:
        mask = decode(unit.mask, f"ControlNet unit {index} mask", "L").resize(init_image.size, Image.NEAREST)
    return init_image, mask


def prepared_map(module: str, image: Image.Image, mask: Image.Image | None) -> np.ndarray:
    """A ready control map as `detect` would have returned it: the picture itself (transparency on white, as
    module none), and for an inpaint module -1 where the mask is set or, without one, where the map is
    transparent (how a stored inpaint map keeps its masked pixels)."""
    pre = _preprocess()
    control = pre.detect("none", image)
    if not pre.MODULES[module].needs_mask:
        return control
    if mask is not None:
        masked = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) > 127
    elif "A" in image.getbands():
        masked = np.asarray(image.getchannel("A")) < 128
    else:
        return control
    control[masked] = -1.0
    return control


def colour_fix_fields(module, encode: Encode | None, control: np.ndarray, hr_control: np.ndarray | None,
                      threshold_a: float, threshold_b: float) -> dict:
    """ControlUnitRun's colour-fix fields for a unit of preprocess.Module `module`: its fitted maps VAE-encoded
    once per pass ([0, 1] -> [-1, 1]), the pass's target colours, and its resolved Variation (and Sharpness,
    +sharp's second slider); {} for a module without the fix or without an encoder."""
    if not module.colour_fix or encode is None:
        return {}
    return {"colour_latent": encode(to_hint(control) * 2 - 1),
            "hr_colour_latent": None if hr_control is None else encode(to_hint(hr_control) * 2 - 1),
            "variation": float(threshold_a), "sharpness": float(threshold_b) if module.sliders[1] else None}


def inpaint_only_fields(module: str, encode: Encode, picture: np.ndarray, detected: np.ndarray, control: np.ndarray,
                        hr_control: np.ndarray | None, resize_mode: str, annotator_dirs: Sequence[Path],
                        lama_device=None) -> tuple[dict, object, torch.Tensor | None]:
    """(ControlUnitRun fields, the last pass's RestoreImage, +lama's noise latent or None) of an inpaint_only(+lama)
    unit (darkroom.control.inpaint_only). `picture`: its picture in [0, 1] at the size of `detected`, its map
    (-1: masked); `control`/`hr_control`: the fitted maps of the passes."""
    from darkroom.control import inpaint_only

    hole = (detected < 0).any(axis=2)
    if module == "inpaint_only+lama":
        from darkroom.control.annotators import lama

        if resize_mode_is_fill(resize_mode):
            # the extension's outpaint fix: the picture first takes the generation's shape, the border masked
            height, width = control.shape[:2]
            picture, hole = fit_map(picture, width, height, resize_mode), (control < 0).any(axis=2)
        filled = lama.fill_picture((picture * 255.0).round().clip(0, 255).astype(np.uint8), hole.astype(np.float32),
                                   annotator_dirs, device=lama_device)
        picture = filled.astype(np.float32) / 255.0
    fields: dict = {}
    restore = None
    for prefix, fitted in (("", control), ("hr_", hr_control)):
        if fitted is None:
            continue
        raw = quantize_map(fit_map(picture, fitted.shape[1], fitted.shape[0], resize_mode))
        latent = fields[prefix + "inpaint_latent"] = encode(to_hint(raw) * 2 - 1)
        masked = (fitted < 0).any(axis=2)
        fields[prefix + "inpaint_mask"] = inpaint_only.latent_mask(masked, fitted.shape[0] // latent.shape[-2])
        restore = inpaint_only.RestoreImage(raw, inpaint_only.blend_mask(masked))
    noise = fields["inpaint_latent"] if module == "inpaint_only+lama" else None
    return fields, restore, noise


def resize_mode_is_fill(resize_mode: str | int) -> bool:
    """Whether a unit's resize mode is "Resize and Fill" (the extension's OUTER_FIT), in any of its spellings."""
    from darkroom.control.annotators.fit import RESIZE_AND_FILL, resize_mode_name

    return resize_mode_name(resize_mode) == RESIZE_AND_FILL


def prepare_control(units: Sequence[ControlUnit], *, files: list[ControlNetFile], cache: ControlNetCache,
                    model_family: str, model_name: str, width: int, height: int,
                    hires_size: tuple[int, int] | None, decode: Decode, init_image: Image.Image | None = None,
                    init_mask: Image.Image | None = None, crop=None, annotator_dirs: Sequence[Path] = (),
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", base=None, encode: Encode | None = None,
                    empty_prompts: bool = False) -> PreparedControl:
    """Prepare the active units of a request (see the module doc); InvalidRequest for any unit that
    cannot run (unknown model, wrong family, missing image), before anything is sampled. `crop` is
    ((x1, y1, x2, y2), (width, height)) of an "only masked" inpainting crop of the init image. `base`
    (control_lora.BaseUNet): the checkpoint's UNet, which Control-LoRA units are built on. `encode` (Encode):
    tile_colorfix units need it for their colour fix; without it they give their map only. `empty_prompts`: the
    prompt and negative prompt are both empty (ReVision units then zero the text context, as the extension)."""
    prepared = PreparedControl(None)
    units = unfold_merged(units)
    runs: list[ControlUnitRun] = []
    noise_latent = None  # an inpaint_only+lama unit's fill, encoded (the last such unit's, as the extension)
    for index, unit in enumerate(units):
        if not unit.active:
            continue
        if unit.batch_images:
            raise InvalidRequest(f"ControlNet unit {index} has batch_images: such a request runs once per picture"
                                 " through the job queue (darkroom.services.control_batch), not in one generation")
        file = loaded = union_type = None  # a reference unit (unit.model_free) has no ControlNet
        if not unit.model_free:
            file = resolve(files, unit.model)
            check_family(file.family, file.name, model_family, model_name, file.noun)
            loaded = cache.get(file.path, dtype=dtype, device=device, base=base)
            check_family(loaded.family, file.name, model_family, model_name, loaded.noun)
        pre = _preprocess()
        module = pre.canonical_module(unit.module)
        if module == "inpaint_only" and init_mask is not None:
            module = "inpaint"  # with img2img's own inpainting, as the extension: inpaint_global_harmonious
        if loaded is not None:
            union_type = union_index(loaded, unit.union_control_type, module, f"ControlNet unit {index}", file.name)
        image, mask = unit_image(unit, index, decode, init_image, init_mask, crop)
        merged = [decode(data, f"ControlNet unit {index} merge_images[{i}]", "RGBA")
                  for i, data in enumerate(unit.merge_images or [])]
        # the unit's own mask masks the picture CLIP sees (the extension's CLIP mask; FaceID's face is not masked)
        clip_mask = None if unit.image is None or mask is None else np.asarray(mask.convert("L"), np.uint8)
        merged_masks = [None if data is None else np.asarray(decode(
                            data, f"ControlNet unit {index} merge_masks[{i}]", "L").resize(pic.size, Image.NEAREST))
                        for i, (data, pic) in enumerate(zip(unit.merge_masks or [None] * len(merged), merged,
                                                            strict=True))]
        ip_tokens = _ip_tokens(loaded, module, image, file, index, annotator_dirs, dtype=dtype, device=device,
                               merged=merged, clip_mask=clip_mask, merged_masks=merged_masks)
        if unit.prepared:  # the map already: not preprocessed again, its settings written as they came
            resolution = unit.processor_res if unit.processor_res > 0 else 512
            detected = prepared_map(module, image, mask)
        else:
            resolution = _resolution(unit, module, image, width, height)
            detected = pre.detect(module, image, resolution=resolution, threshold_a=unit.threshold_a,
                                  threshold_b=unit.threshold_b, mask=mask, annotator_dirs=annotator_dirs,
                                  seed=seed)
        threshold_a, threshold_b = pre.thresholds(module, unit.threshold_a, unit.threshold_b)
        vision = _vision(loaded, module, image, file, index, annotator_dirs, model_family=model_family,
                         noise=threshold_a, seed=seed, dtype=dtype, device=device, clip_mask=clip_mask)
        control = quantize_map(fit_map(detected, width, height, unit.resize_mode))
        hr_control = None
        if hires_size is not None:
            hr_control = quantize_map(fit_map(detected, hires_size[0], hires_size[1], unit.resize_mode))
            prepared.hr_maps[index] = hr_control
        prepared.maps[index] = control
        colour = colour_fix_fields(pre.MODULES[module], encode, control, hr_control, threshold_a, threshold_b)
        if module in ("inpaint_only", "inpaint_only+lama") and encode is not None:
            picture = _picture_of(pre, image, detected, unit.prepared)
            inpaint, restore, noise = inpaint_only_fields(module, encode, picture, detected, control, hr_control,
                                                          unit.resize_mode, annotator_dirs, lama_device=device)
            colour.update(inpaint)
            prepared.restores.append(restore)
            noise_latent = noise if noise is not None else noise_latent
        context_tokens = _instantid_context(file, loaded, runs, index)
        region, advanced = _region(unit, loaded, index, decode), _advanced(unit, loaded, index)
        runs.append(ControlUnitRun(
            loaded, to_hint(control), weight=unit.weight, start=unit.guidance_start, end=unit.guidance_end,
            mode=unit.control_mode, guess_mode=unit.guess_mode, module=module, hr_option=unit.hr_option,
            hr_hint=None if hr_control is None else to_hint(hr_control), union_type=union_type, **colour,
            fidelity=threshold_a if unit.model_free else 0.5, ip_tokens=ip_tokens, vision=vision,
            context_tokens=context_tokens, region=region, advanced=advanced))
        line = format_unit({
            "module": module, "model": "None" if file is None else file.title, "weight": unit.weight,
            "resize_mode": unit.resize_mode,
            "processor_res": resolution, "threshold_a": threshold_a, "threshold_b": threshold_b,
            "guidance_start": unit.guidance_start, "guidance_end": unit.guidance_end,
            "pixel_perfect": unit.pixel_perfect, "control_mode": unit.control_mode,
            "hr_option": unit.hr_option, "guess_mode": unit.guess_mode})
        if line is not None:
            prepared.infotext[f"ControlNet {index}"] = line
    revision = [r for r in runs if r.module.startswith("revision")]
    ignore = any(r.module == "revision_ignore_prompt" for r in revision) or (bool(revision) and empty_prompts)
    prepared.control = Control(runs, noise_latent=noise_latent, ignore_prompt=ignore) if runs else None
    return prepared


def _takes_many(module: str) -> bool:
    """An IP-Adapter preprocessor: a merged unit averages its pictures' tokens instead of being unfolded."""
    from darkroom.control import ipadapter

    try:
        key = _preprocess().canonical_module(module)
    except InvalidRequest:
        return False
    # the extension's IP-Adapter preprocessors; InstantID's is not one (its units are unfolded there too)
    return key in ipadapter.MODULES or (key in ipadapter.FACE_MODULES and not key.startswith("instant_id"))


def unfold_merged(units: Sequence[ControlUnit]) -> list[ControlUnit]:
    """The extension's merge input: a unit with `merge_images` becomes one unit per picture, each at weight /
    their count, unless it is an IP-Adapter unit (which averages its pictures' tokens, _ip_tokens)."""
    out = []
    for unit in units:
        if not unit.merge_images or _takes_many(unit.module):
            out.append(unit)
            continue
        pictures = [unit.image, *unit.merge_images]
        masks = [unit.mask, *(unit.merge_masks or [None] * len(unit.merge_images))]
        weight = unit.weight / len(pictures)
        out += [unit.model_copy(update={"image": p, "mask": m, "merge_images": None, "merge_masks": None,
                                        "weight": weight})
                for p, m in zip(pictures, masks, strict=True)]
    return out


def _steers_residuals(loaded) -> bool:
    """A ControlNet (any kind that adds residuals) or a T2I-Adapter: what advanced_weighting reaches."""
    from darkroom.control.adapter import LoadedAdapter

    return loaded is not None and (isinstance(loaded, LoadedAdapter) or not any(
        getattr(loaded, flag, False) for flag in ("is_ipadapter", "is_lllite", "is_style")))


def _region(unit: ControlUnit, loaded, index: int, decode: Decode) -> torch.Tensor | None:
    """The unit's effective_region_mask as [1, 1, H, W] in [0, 1] (its first channel), or None; only the units the
    extension restricts take one (ControlNets, T2I-Adapters, IP-Adapters)."""
    if unit.effective_region_mask is None:
        return None
    if not (_steers_residuals(loaded) or getattr(loaded, "is_ipadapter", False)):
        what = loaded.noun if loaded is not None else f"the model-free {unit.module}"
        raise InvalidRequest(f"ControlNet unit {index}: effective_region_mask works with ControlNets, T2I-Adapters"
                             f" and IP-Adapters, not {what}; leave it out")
    picture = decode(unit.effective_region_mask, f"ControlNet unit {index} effective_region_mask", "RGB")
    first = np.asarray(picture, dtype=np.float32)[:, :, 0] / 255.0
    return torch.from_numpy(np.ascontiguousarray(first))[None, None]


def _advanced(unit: ControlUnit, loaded, index: int) -> list[float] | None:
    """The unit's advanced_weighting for a ControlNet (one factor per residual) or a T2I-Adapter (per feature);
    other units ignore it, as the extension does. Too few factors is an InvalidRequest naming the count."""
    if unit.advanced_weighting is None or not _steers_residuals(loaded):
        return None
    from darkroom.control.adapter import SOFT_SCALES, LoadedAdapter

    if isinstance(loaded, LoadedAdapter):
        wanted = len(SOFT_SCALES)
    else:
        wanted = len(getattr(loaded.model, "controlnet_down_blocks", ())) + 1
    if len(unit.advanced_weighting) < wanted:
        raise InvalidRequest(f"ControlNet unit {index}: advanced_weighting has {len(unit.advanced_weighting)}"
                             f" factors; {loaded.name} takes {wanted} (one per layer it adds to)")
    return [float(w) for w in unit.advanced_weighting]


def _instantid_context(file, loaded, runs: list[ControlUnitRun], index: int):
    """An InstantID ControlNet's context (apply.ControlUnitRun.context_tokens): the face tokens of the IP-Adapter
    unit right before it, as the extension requires; None for other units."""
    if file is None or "instant_id" not in file.name.lower() or getattr(loaded, "is_ipadapter", False):
        return None
    before = runs[-1] if runs else None
    if before is None or before.ip_tokens is None:
        raise InvalidRequest(f"ControlNet unit {index}: {file.name} is InstantID's ControlNet; put its IP-Adapter"
                             " unit (ip-adapter_instant_id_sdxl, module instant_id_face_embedding) in the unit right"
                             " before it: the ControlNet reads that unit's face instead of the prompt")
    return before.ip_tokens


def _clip_tower(encoder: str, needed_by: str, annotator_dirs: Sequence[Path], *, dtype: torch.dtype, device):
    """The CLIP vision tower `encoder` (ipadapter.CLIP_FILES) from the user's files; InvalidRequest naming the file
    and where it was looked for when it is not there (nothing is fetched)."""
    from darkroom.control import ipadapter
    from darkroom.control.annotators import files as annotator_files

    name = ipadapter.CLIP_FILES[encoder]
    path = annotator_files.find(name, ipadapter.CLIP_KIND, annotator_dirs)
    if path is None:
        also = annotator_files.ALSO_AS.get(name, ())
        raise InvalidRequest(f"{needed_by} needs the {ipadapter.CLIP_NAMES[encoder]} vision model: {name} (or"
                             f" {also[0]}) in <home>/models/clip_vision, the extension's annotator/downloads/"
                             "clip_vision, or Forge's or ComfyUI's models/clip_vision",
                             hint="searched: " + ", ".join(str(d) for d in annotator_dirs))
    return ipadapter.load_clip(path, dtype=dtype, device=device)


def _vision(loaded, module: str, image: Image.Image, file, index: int, annotator_dirs: Sequence[Path], *,
            model_family: str, noise: float, seed: int, dtype: torch.dtype, device,
            clip_mask: np.ndarray | None = None) -> torch.Tensor | None:
    """A T2I-Adapter style unit's tokens or a ReVision unit's embedding (darkroom.control.vision_prompt), the CLIP
    tower freed afterwards; None for other units."""
    from darkroom.control import ipadapter, vision_prompt
    from darkroom.control.annotators.imageops import hwc3

    is_style = getattr(loaded, "is_style", False)
    if not is_style and module not in vision_prompt.TOWERS:
        return None
    where = f"ControlNet unit {index}"
    if module == vision_prompt.STYLE_MODULE and not is_style:
        raise InvalidRequest(f"{where}: the t2ia_style_clipvision preprocessor goes with a T2I-Adapter style model"
                             f" (t2iadapter_style_sd14v1), not {file.name if file else 'no model'}")
    if is_style and module != vision_prompt.STYLE_MODULE:
        raise InvalidRequest(f"{where}: {file.name} is a T2I-Adapter style model; give it the t2ia_style_clipvision"
                             f" preprocessor (it embeds the picture with CLIP vision), not {module}")
    if module in vision_prompt.REVISION_MODULES and not model_family.startswith("sdxl"):
        raise InvalidRequest(f"{where}: {module} (ReVision) works with SDXL checkpoints only; this one is"
                             f" {model_family.upper()}")
    needed_by = file.name if file is not None else module
    clip = _clip_tower(vision_prompt.TOWERS[module], needed_by, annotator_dirs, dtype=dtype, device=device)
    try:
        pixels = ipadapter.clip_pixels(hwc3(image), clip_mask)
        if is_style:
            return vision_prompt.style_tokens(loaded, clip, pixels)
        return vision_prompt.revision_embedding(clip, pixels, noise, seed)
    finally:
        del clip


def _ip_tokens(loaded, module: str, image: Image.Image, file, index: int, annotator_dirs: Sequence[Path], *,
               dtype: torch.dtype, device, merged: Sequence[Image.Image] = (), clip_mask: np.ndarray | None = None,
               merged_masks: Sequence[np.ndarray | None] = ()):
    """An IP-Adapter unit's (prompt, negative) image tokens: its picture through the CLIP vision tower its
    preprocessor names (darkroom.control.ipadapter), the tower freed afterwards; None for other units. With
    `merged` pictures (the extension's merge input) the tokens of all of them are averaged, each picture
    CLIP-masked by its own mask (`merged_masks`)."""
    from darkroom.control import ipadapter

    is_adapter = getattr(loaded, "is_ipadapter", False)
    if not is_adapter and module not in ipadapter.MODULES and module not in ipadapter.FACE_MODULES:
        return None
    where = f"ControlNet unit {index}"
    if not is_adapter:
        raise InvalidRequest(f"{where}: the {module} preprocessor goes with an IP-Adapter model, not"
                             f" {file.name if file else 'no model'}")
    if module not in ipadapter.MODULES and module not in ipadapter.FACE_MODULES:
        raise InvalidRequest(f"{where}: {file.name} is an IP-Adapter; give it the {ipadapter.adapter_module(loaded)}"
                             " preprocessor (it embeds the picture with CLIP vision), not " + module)
    from darkroom.control.annotators.imageops import hwc3

    encoder = ipadapter.encoder_for(module, loaded, file.name)
    pictures = [hwc3(picture) for picture in (image, *merged)]
    faces = [_face_embedding(loaded, picture, annotator_dirs) for picture in pictures]
    clip = None if encoder is None else _clip_tower(encoder, file.name, annotator_dirs, dtype=dtype, device=device)
    try:
        masks = [clip_mask, *merged_masks] if merged_masks else [clip_mask] + [None] * (len(pictures) - 1)
        each = [ipadapter.tokens(loaded, clip, None if clip is None else ipadapter.clip_pixels(
                    picture, None if loaded.face else m), face)
                for picture, face, m in zip(pictures, faces, masks, strict=True)]
    finally:
        del clip
    if len(each) == 1:
        return each[0]
    return torch.stack([c for c, _ in each]).mean(0), torch.stack([u for _, u in each]).mean(0)


def _face_embedding(loaded, picture: np.ndarray, annotator_dirs: Sequence[Path]) -> torch.Tensor | None:
    """What a FaceID or InstantID adapter takes from the picture ([1, 512]), None for other adapters: InstantID
    the raw embedding from antelopev2 (annotators.instantid), FaceID the normed one from buffalo_l."""
    if loaded.variant == "instantid":
        from darkroom.control.annotators import instantid

        return torch.from_numpy(np.asarray(instantid.face_embedding(picture, annotator_dirs), np.float32))[None]
    if loaded.face:
        from darkroom.control.annotators import insightface

        found = insightface.largest_face(insightface.faces(picture, annotator_dirs))
        return torch.from_numpy(np.asarray(found.normed_embedding, np.float32))[None]
    return None


def _picture_of(pre, image: Image.Image, detected: np.ndarray, prepared: bool) -> np.ndarray:
    """An inpaint unit's picture in [0, 1] at its map's size: the image itself, or for a ready map (which keeps
    no picture under its mask) the map's colours with the median colour there."""
    if prepared:
        from darkroom.control.annotators.fit import fill_masked

        return fill_masked(detected, empty=0.5)
    return pre.detect("none", image)
