"""txt2img: GenerationRequest -> GenerationResult, with progress, previews and interrupt.

Steps mirror a diffusers pipeline: (1) check inputs, (2) load the model, (3) encode the
prompts, (4) per batch: noise from per-image generators seeded s, s+1, ... on the request's
randn_source (engine/rng.py; a batch of N equals N single runs), (5) denoise with the
chosen scheduler and classifier-free guidance, (6) decode and write PNGs with infotext.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import darkroom
from darkroom.control.load import ControlNetCache
from darkroom.engine import memory, presets, rng, samplers, vae_tiling
from darkroom.engine.admission import Limits, admit_engine
from darkroom.engine.cache import ModelCache
from darkroom.engine.img2img import FILL_NAMES, RESIZE_NAMES, Source, prepare_source
from darkroom.engine.interrupt import answering, answering_any, stoppable, units_of
from darkroom.engine.lora import LoraLibrary, apply_loras, extract_lora_tags, lora_hashes_infotext
from darkroom.engine.sampling import SKIPPED, Guidance, Init, Noise, StepCallback, StepEvent, denoise
from darkroom.engine.tiling import seamless
from darkroom.engine.token_merging import token_merging
from darkroom.errors import DarkroomError, Interrupted, InvalidRequest, NonFiniteResult, StorageError
from darkroom.faces import FaceRestorer
from darkroom.metadata.images import SUFFIXES, encode_file, encode_png
from darkroom.metadata.infotext import build_infotext
from darkroom.models.header import read_header
from darkroom.models.library import ModelLibrary
from darkroom.models.loader import LoadedModel
from darkroom.models.vae_file import VaeLibrary, swap_vae
from darkroom.request import GeneratedImage, GenerationRequest, GenerationResult
from darkroom.text.conditioning import Conditioning, PromptEncoder
from darkroom.text.embeddings import EmbeddingLibrary, format_ti_hashes
from darkroom.text.prompt_parser import parse_prompt_attention
from darkroom.text.schedule import split_and
from darkroom.text.wildcards import PromptPlan, PromptPlanner
from darkroom.upscale import UpscalerLibrary

__all__ = ["Engine", "StepEvent", "StepCallback", "HIRES_UPSCALERS", "encode_image", "latents_to_images"]
HIRES_UPSCALERS = ("Latent", "Latent (nearest)", "Lanczos", "Nearest")
OUTPUT_SUFFIXES = frozenset(SUFFIXES.values())  # numbered outputs of every format share one count


ImageCallback = Callable[[GeneratedImage], None]


def random_seed() -> int:
    return random.SystemRandom().randrange(4294967294)


def _to_pixels(image: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None]


def _encode_pixels(model: LoadedModel, pixels: torch.Tensor, tiling: str = "auto",
                   tile_pixels: int = vae_tiling.TILE_PIXELS) -> torch.Tensor:
    return vae_tiling.encode(model, pixels, mode=tiling, tile_pixels=tile_pixels)


def encode_image(model: LoadedModel, image: Image.Image, *, tiling: str = "auto",
                 tile_pixels: int = vae_tiling.TILE_PIXELS) -> torch.Tensor:
    """RGB image -> scaled latents [1, c, h/f, w/f]: the distribution's mode (deterministic, seed-independent).

    `tiling`: "auto" (tiled when the untiled pass would not fit), "always" or "never" (see vae_tiling).
    """
    return _encode_pixels(model, _to_pixels(image), tiling, tile_pixels)


def latents_to_images(model: LoadedModel, latents: torch.Tensor, *, tiling: str = "auto",
                      tile_pixels: int = vae_tiling.TILE_PIXELS) -> list[Image.Image]:
    """Scaled latents -> RGB images; `tiling` as for encode_image."""
    decoded = vae_tiling.decode(model, latents, mode=tiling, tile_pixels=tile_pixels)
    arr = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class Suspects:
    """The final guard before decoding: NaN or inf latents raise an error naming what may cause them.

    Decoded, such latents are a silent all-black image. The likely causes, in the order named:
    the LoRAs in the prompt, extreme prompt weights or CFG scale, then the model itself (damaged
    weights, or fp16 overflow).
    """

    def __init__(self, model: LoadedModel, req: GenerationRequest, prompt: str, loras: list):
        self.model, self.req, self.prompt, self.loras = model, req, prompt, loras

    def check(self, latents) -> None:
        if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
            raise NonFiniteResult("sampling gave NaN or infinite values (the image would be black); suspects: "
                                  + "; ".join(self.names()))

    def names(self) -> list[str]:
        out = [f"the LoRA '{u.mentioned_name}' (weight {u.te_weight:g}/{u.unet:g})" for u in self.loras]
        weight = self._largest_weight()
        if weight > 2:
            out.append(f"a prompt weight of {weight:g} (try values near 1)")
        if self.req.cfg_scale > 30:
            out.append(f"the CFG scale {self.req.cfg_scale:g} (try 4-12)")
        dtype = str(self.model.dtype).replace("torch.", "")
        hint = "; try precision fp32" if dtype == "float16" else ""
        out.append(f"the model '{self.model.name}' ({dtype}: damaged weights or an overflow{hint})")
        return out

    def _largest_weight(self) -> float:
        """The largest AND or emphasis weight of the prompts (either sign, inf included)."""
        parts = [*split_and(self.prompt), (self.req.negative_prompt, 1.0)]
        weights = [abs(w) for _, w in parts]
        weights += [abs(w) for text, _ in parts for _, w in parse_prompt_attention(text)]
        return max(weights)


class Engine:
    """Generates images; holds the model cache and the library it resolves names with."""

    def __init__(self, library: ModelLibrary, cache: ModelCache, *, default_model: Callable[[], Path] | None = None):
        self.library = library
        self.cache = cache
        self.default_model = default_model
        self._lock = threading.Lock()
        self.loras = LoraLibrary(library.home, library.hashes)
        self.embeddings = EmbeddingLibrary(library.home, library.hashes)
        self.vaes = VaeLibrary(library.home, library.hashes, allow_pickle=cache.allow_pickle)
        self.upscalers = UpscalerLibrary(library.home, device=cache.device.device,
                                         dtype=cache.device.dtype)  # the hires fix's and the extras' models
        self.faces = FaceRestorer(library.home, device=cache.device.device)  # restore_faces (darkroom/faces)
        # VAE tiling: "auto" (tiled when the untiled decode/encode would not fit), "always" or "never"
        self.vae_tiling = "auto"
        self.vae_tile_pixels = vae_tiling.TILE_PIXELS
        self.limits = Limits()  # maxima every request is admitted against (the studio and CLI set them from settings)
        self.prompts = PromptPlanner(library.home)  # styles and dynamic prompts (darkroom/text/wildcards.py)
        self.controlnets = ControlNetCache()  # the last ControlNets used, kept loaded (darkroom/control)
        cache.companions.append(self.controlnets)  # freed with the checkpoint (ModelCache.unload)

    def check_inputs(self, req: GenerationRequest) -> tuple[samplers.Sampler, str]:
        presets.check_preset_name(req.preset)
        self.prompts.check(req)  # unknown styles, dynamic syntax that does not parse, missing wildcards
        if req.enable_hr and req.hr_upscaler not in HIRES_UPSCALERS:
            self.hires_model_upscaler(req.hr_upscaler)
        if req.restore_faces:
            self.faces.check()  # the files are there: a clear 422 before sampling, not after
        if any(u.active for u in req.controlnet):  # unknown ControlNet names: a 422 before any model loads
            from darkroom.control.files import find_controlnets, resolve

            files = find_controlnets(self.library.home)
            for unit in req.controlnet:
                if unit.active and not unit.model_free:
                    resolve(files, unit.model)
        return samplers.resolve(req.sampler, req.schedule)

    def admit(self, req: GenerationRequest) -> GenerationRequest:
        """Refuse `req` (422, one line) when it is over self.limits or would not fit in the memory free,
        without loading the model; returns it with its size settled (darkroom/engine/admission.py)."""
        return admit_engine(self, req)

    def hires_model_upscaler(self, name: str) -> str:
        """The upscaler model file's listed name for the hires fix, or InvalidRequest naming every choice."""
        try:
            return self.upscalers.file(name).name
        except InvalidRequest:
            choices = [*HIRES_UPSCALERS, *(f.name for f in self.upscalers.files())]
            raise InvalidRequest(f"unknown hires upscaler {name!r}; choose one of: {', '.join(choices)}") from None

    def model_path(self, req: GenerationRequest) -> Path:
        if req.model:
            return self.library.resolve(req.model)
        entries = [e for e in self.library.scan()
                   if e.error is None and (e.detection is None or e.detection.kind == "checkpoint")]
        if entries:
            return entries[0].path
        if self.default_model is not None:
            return self.default_model()
        raise InvalidRequest("no model given and none found; put a checkpoint in the models folder or pass --model")

    def load(self, req: GenerationRequest) -> LoadedModel:
        return self.cache.get(self.model_path(req))

    def generate(self, req: GenerationRequest, *, on_step: StepCallback | None = None,
                 cancel: threading.Event | None = None, output_dir: Path | None = None,
                 skip: threading.Event | None = None, on_image: ImageCallback | None = None) -> GenerationResult:
        """Run `req`. `cancel` stops (finished images kept); `skip` abandons the current batch only.

        `on_image` sees each image as soon as it is written, so a caller (the job queue)
        can index it before the next batch starts: a crash loses at most the batch in progress.
        Styles and dynamic prompts come first (darkroom/text/wildcards.py); when images of one batch
        get different prompts, each run of images sharing one is sampled on its own (same pixels).
        """
        plan = self.prompts.plan(req, max_images=self.limits.max_batch_count * req.batch_size,
                                 random_seed=random_seed)
        run = dict(cancel=cancel, output_dir=output_dir, skip=skip, on_image=on_image)
        try:
            if plan.uniform:
                result = self._generate(plan.single(), on_step=on_step, **run)
            else:
                result = self._generate_chunks(plan, on_step, run)
        finally:
            memory.return_freed_memory()  # big freed blocks stay in the heap while working
        result.request = plan.restore(result.request)
        return result

    def _generate_chunks(self, plan: PromptPlan, on_step: StepCallback | None, run: dict) -> GenerationResult:
        """The plan's runs of images one after another; progress reports the batch each belongs to."""
        results: list[GenerationResult] = []
        for chunk in plan.chunks():
            def step(event: StepEvent, batch: int = chunk.batch) -> None:
                on_step(dataclasses.replace(event, batch_index=batch, batch_count=plan.request.n_iter))

            results.append(self._generate(chunk.request, on_step=step if on_step else None, **run))
            if results[-1].interrupted:
                break
        last = results[-1]
        return GenerationResult(request=results[0].request, images=[im for r in results for im in r.images],
                                interrupted=last.interrupted, model_name=last.model_name, model_hash=last.model_hash,
                                timings={k: sum(r.timings.get(k, 0.0) for r in results) for k in last.timings},
                                info=last.info)

    @torch.no_grad()
    def _generate(self, req: GenerationRequest, *, on_step: StepCallback | None = None,
                  cancel: threading.Event | None = None, output_dir: Path | None = None,
                  skip: threading.Event | None = None, on_image: ImageCallback | None = None) -> GenerationResult:
        """Run `req`, its prompts already expanded (see generate)."""
        req = self.apply_preset(req)  # few-step presets: docs/few-step.md
        spec, schedule = self.check_inputs(req)
        self.admit(req)  # limits and memory, before anything is allocated (docs/limits.md)
        if req.mask is not None and req.init_image is None:
            raise InvalidRequest("a mask needs an init image to inpaint")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with self._lock:
            model = self.load(req)
            timings["load"] = time.perf_counter() - t0
            req, source = self._fit(model, req)
            model_hash = self.library.short_hash(self.library.describe(model.path))
            seed = random_seed() if req.seed == -1 else req.seed
            subseed = random_seed() if req.subseed_strength > 0 and req.subseed == -1 else req.subseed
            result = GenerationResult(request=req, model_name=model.name, model_hash=model_hash)
            prompt, tags = extract_lora_tags(req.prompt)
            lora_uses = self.loras.uses(tags)
            separate_vae = self.vaes.load(req.vae or "Automatic", model, checkpoint=model.path)
            with ExitStack() as stack:
                # LoRAs are merged into the weights and a separate VAE swapped in for this request
                # only (both restored exactly on exit), around prompt encoding and sampling alike
                applied = stack.enter_context(apply_loras(model, lora_uses))
                stack.enter_context(swap_vae(model, separate_vae.vae if separate_vae else None))
                stack.enter_context(seamless(model, req.tiling))  # after the swap: the VAE that decodes wraps too
                t1 = time.perf_counter()
                encoder = PromptEncoder(model, req.clip_skip, embeddings=self.embeddings.for_model(model),
                                        cancel=cancel)
                try:
                    guidance = self._guidance(model, req, encoder, prompt)
                    init = (self._init(model, req, source, cancel, self.vae_tiling, self.vae_tile_pixels)
                            if source is not None else None)
                    control = self._control(model, req, source, seed, applied.uses, cancel)
                except Interrupted:  # stopped while a long prompt or the source was encoded: nothing made, nothing lost
                    result.interrupted = True
                    result.timings = {**timings, "total": time.perf_counter() - t0}
                    return result
                timings["encode"] = time.perf_counter() - t1
                extra = self._infotext_extra(req, source, subseed)
                extra.update(control.infotext if control is not None else {})
                chunks = control.chunks() if control is not None else None
                if lora_uses:
                    extra["Lora hashes"] = lora_hashes_infotext(applied)
                if encoder.used_embeddings:
                    extra["TI hashes"] = format_ti_hashes(encoder.used_embeddings)
                if separate_vae is not None:
                    extra.update(separate_vae.infotext())
                if req.restore_faces:
                    extra["Face restoration"] = self.faces.check()  # the webui writes the model's name
                t2 = time.perf_counter()
                suspects = Suspects(model, req, prompt, lora_uses)
                for batch in range(req.n_iter):
                    first = batch * req.batch_size
                    noise = Noise([seed + first + i for i in range(req.batch_size)],
                                  [subseed + first + i for i in range(req.batch_size)], req.subseed_strength,
                                  source=req.randn_source, seed_delta=req.eta_noise_seed_delta)
                    latents = self._batch(model, req, spec, schedule, noise, guidance, init, batch, on_step, cancel,
                                          skip, suspects, control)
                    if latents is None:
                        result.interrupted = True
                        break
                    images = self._decode(model, latents, cancel, skip) if latents is not SKIPPED else SKIPPED
                    if images is None:  # interrupted while decoding: this batch is dropped, earlier ones kept
                        result.interrupted = True
                        break
                    if images is SKIPPED:
                        skip.clear()
                        continue
                    if control is not None and control.restores:  # inpaint_only's paste-back, before faces as there
                        images = [control.restore(image) for image in images]
                    if req.restore_faces:  # after decoding, before writing, as the webui (darkroom/faces)
                        images = self._restore_faces(images, cancel)
                        if images is None:
                            result.interrupted = True
                            break
                    for i, image in enumerate(images):
                        if source is not None:
                            image = source.finish(image)
                        image_extra = {**extra, "Variation seed": noise.subseeds[i]} if req.subseed_strength else extra
                        done = self._finish(req, noise.seeds[i], image, model, model_hash, schedule, output_dir,
                                            image_extra, chunks=chunks)
                        result.images.append(done)
                        if on_image is not None:
                            on_image(done)
                timings["sampling"] = time.perf_counter() - t2
            timings["total"] = time.perf_counter() - t0
            result.timings = timings
            result.info = {"schedule": schedule, "device": str(model.device),
                           "dtype": str(model.dtype).replace("torch.", "")}
            return result

    @staticmethod
    def _fit(model: LoadedModel, req: GenerationRequest) -> tuple[GenerationRequest, Source | None]:
        """Settle the size: the init image's (img2img), else the model's native size; prepare the source."""
        source = None
        if req.init_image is not None:
            source, w, h = prepare_source(
                req.init_image, req.mask, width=req.width, height=req.height, resize_mode=req.resize_mode,
                mask_blur=req.mask_blur, invert=req.inpainting_mask_invert, fill=req.inpainting_fill,
                full_res=req.inpaint_full_res, padding=req.inpaint_full_res_padding,
                latent_factor=model.vae_scale_factor)
            req = req.model_copy(update={"width": w, "height": h})
        elif req.width is None or req.height is None:
            size = model.native_size
            req = req.model_copy(update={"width": req.width or size, "height": req.height or size})
        f = model.vae_scale_factor
        if req.width % f or req.height % f:
            raise InvalidRequest(f"size {req.width}x{req.height} must be a multiple of {f} for this model")
        return req, source

    def _guidance(self, model: LoadedModel, req: GenerationRequest, encoder: PromptEncoder, prompt: str) -> Guidance:
        negative = req.negative_prompt if req.cfg_scale > 1.0 else None
        guidance = Guidance(prompt, negative, req.cfg_scale, encoder.encode,
                            lambda text: encoder.encode(text, zero_if_empty=True), added=self._added_cond_fn(model))
        guidance.schedule(req.steps)  # encode every text now: errors surface before sampling, TI hashes are known
        return guidance

    def _batch(self, model: LoadedModel, req: GenerationRequest, spec: samplers.Sampler, schedule: str, noise: Noise,
               guidance: Guidance, init: Init | None, batch: int, on_step, cancel, skip, suspects: Suspects,
               control=None):
        """Sample one batch (and its hires pass); each pass's latents are checked before anything decodes them."""
        f = model.vae_scale_factor
        shape = (model.unet.config.out_channels, req.height // f, req.width // f)
        with token_merging(model.unet, req.token_merging_ratio or 0.0):
            latents = denoise(model, spec, schedule, steps=req.steps, noise=noise, shape=shape, guidance=guidance,
                              init=init, eta=req.eta, batch=batch, batch_count=req.n_iter, on_step=on_step,
                              cancel=cancel, skip=skip, control=control.first_pass(req.enable_hr) if control else None)
        suspects.check(latents)
        if req.enable_hr and isinstance(latents, torch.Tensor):
            latents = self._hires(model, req, spec, schedule, latents, noise, guidance, batch, on_step, cancel, skip,
                                  control.hires_pass() if control else None)
            suspects.check(latents)
        return latents

    def _decode(self, model: LoadedModel, latents: torch.Tensor, cancel, skip):
        """Latents -> images (tiled as self.vae_tiling says); None when cancelled, SKIPPED when skipped,
        both answered before each block of the decoder (so between tiles too)."""
        return stoppable(lambda: latents_to_images(model, latents, tiling=self.vae_tiling,
                                                   tile_pixels=self.vae_tile_pixels),
                         units_of(model.vae.decoder), cancel, skip)

    def _restore_faces(self, images: list[Image.Image], cancel) -> list[Image.Image] | None:
        """Each image with its faces restored; None when `cancel` stopped it (the batch is dropped)."""
        try:
            return [self.faces.restore(image, cancel=cancel) for image in images]
        except Interrupted:
            return None

    def _encode(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        return _encode_pixels(model, pixels, self.vae_tiling, self.vae_tile_pixels)

    @staticmethod
    def _init(model: LoadedModel, req: GenerationRequest, source: Source, cancel=None, tiling: str = "auto",
              tile_pixels: int = vae_tiling.TILE_PIXELS) -> Init:
        """Encode the prepared source; apply "latent noise"/"latent nothing" to the masked area.

        Raises Interrupted when `cancel` is set while the source is encoded (checked before each encoder block)."""
        with answering(units_of(model.vae.encoder), cancel):
            return Engine._init_latents(model, req, source, tiling, tile_pixels)

    @staticmethod
    def _init_latents(model: LoadedModel, req: GenerationRequest, source: Source, tiling: str,
                      tile_pixels: int) -> Init:
        latents = _encode_pixels(model, _to_pixels(source.image), tiling, tile_pixels)
        mask = masked_latents = None
        if source.latent_mask is not None:
            mask = torch.from_numpy(source.latent_mask)[None, None].to(model.device)
            if req.inpainting_fill == 2:  # latent noise
                fill = rng.randn(req.randn_source, req.seed if req.seed >= 0 else 0, tuple(latents.shape))
                latents = latents * (1 - mask) + fill.to(model.device) * mask
            elif req.inpainting_fill == 3:  # latent nothing
                latents = latents * (1 - mask)
            if model.unet.config.in_channels == 9:
                # the masked image as the webui and diffusers make it: the hole is 0 (mid-gray) in -1..1
                keep = torch.from_numpy(np.asarray(source.mask) < 128)[None, None]
                pixels = _to_pixels(source.image) * keep
                masked_latents = _encode_pixels(model, pixels, tiling, tile_pixels)
        return Init(latents, req.denoising_strength, mask, masked_latents)

    def _hires(self, model: LoadedModel, req: GenerationRequest, spec: samplers.Sampler, schedule: str,
               latents: torch.Tensor, noise: Noise, guidance: Guidance, batch: int, on_step, cancel, skip,
               control=None):
        """The hires fix: upscale the first pass (in latent or image space), then img2img at the new size."""
        w2, h2 = req.hires_size()
        f = model.vae_scale_factor
        if req.hr_upscaler.startswith("Latent"):
            mode = "nearest" if "nearest" in req.hr_upscaler else "bilinear"
            up = torch.nn.functional.interpolate(latents, size=(h2 // f, w2 // f), mode=mode)
        else:
            images = self._decode(model, latents, cancel, skip)
            if images is None or images is SKIPPED:
                return images
            if req.hr_upscaler in HIRES_UPSCALERS:
                resample = Image.NEAREST if req.hr_upscaler == "Nearest" else Image.LANCZOS
                resized = [_to_pixels(im.resize((w2, h2), resample)) for im in images]
            else:  # an upscaler model, as the webui: its passes, then Lanczos to the exact size (tiles answer cancel)
                try:
                    resized = [_to_pixels(self.upscalers.resize_to(im, w2, h2, req.hr_upscaler, cancel=cancel))
                               for im in images]
                except Interrupted:
                    return None
            up = stoppable(lambda: torch.cat([self._encode(model, p) for p in resized]),
                           units_of(model.vae.encoder), cancel, skip)
            if up is None or up is SKIPPED:
                return up
        steps = req.hr_second_pass_steps or req.steps
        init = Init(up, req.denoising_strength)
        shape = (model.unet.config.out_channels, h2 // f, w2 // f)
        with token_merging(model.unet, req.token_merging_ratio_hr or req.token_merging_ratio or 0.0):
            return denoise(model, spec, schedule, steps=steps, noise=noise, shape=shape, guidance=guidance,
                           init=init, eta=req.eta, batch=batch, batch_count=req.n_iter, phase="hires",
                           on_step=on_step, cancel=cancel, skip=skip, control=control)

    def _control(self, model: LoadedModel, req: GenerationRequest, source: Source | None, seed: int, loras=(),
                 cancel=None):
        """The request's ControlNet units prepared once (darkroom/control/prepare.py), or None without any.
        `loras`: the LoRA uses merged into the model now (a Control-LoRA is built on the merged UNet). tile_colorfix
        maps are encoded as the init image is (this VAE, its tiling); Interrupted when `cancel` stops that or a
        preprocessor's net."""
        if not any(u.active for u in req.controlnet):
            return None

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with answering(units_of(model.vae.encoder), cancel):
                return self._encode(model, pixels)

        from darkroom.control import preprocess
        from darkroom.control.control_lora import base_of
        from darkroom.control.files import find_controlnets
        from darkroom.control.prepare import prepare_control
        from darkroom.engine.img2img import decode_image

        placement = getattr(model, "placement", None)  # a low-VRAM plan: the ControlNets follow the UNet's
        with answering_any(cancel):  # the preprocessors' nets, built inside (a depth net takes seconds on a CPU)
            prepared = prepare_control(
                req.controlnet, files=find_controlnets(self.library.home), cache=self.controlnets,
                model_family=model.family.id, model_name=model.name, width=req.width, height=req.height,
                hires_size=req.hires_size() if req.enable_hr else None, decode=lambda data, name, mode: decode_image(
                    data, name, mode=mode), init_image=source.image if source is not None else None,
                init_mask=source.mask if source is not None else None,
                crop=(source.box, source.original.size) if source is not None and source.box is not None else None,
                annotator_dirs=preprocess.annotator_dirs(self.library.home), seed=seed, dtype=model.dtype,
                device=model.device if placement is None else placement.controlnet_device(),
                base=base_of(model, loras), encode=encode,
                empty_prompts=not req.prompt.strip() and not req.negative_prompt.strip())
        if placement is not None and prepared.control is not None:
            for module in prepared.control.modules():
                placement.adopt(module)
        return prepared

    @staticmethod
    def _infotext_extra(req: GenerationRequest, source: Source | None, subseed: int) -> dict[str, object]:
        """The webui's infotext keys for img2img, inpainting, hires fix and variation seeds."""
        extra: dict[str, object] = {}
        if req.init_image is not None or req.enable_hr:
            extra["Denoising strength"] = req.denoising_strength
        spec = samplers.resolve(req.sampler, req.schedule)[0]
        if not spec.stochastic or spec.scheduler == "DPMSolverSDEScheduler":
            extra["ENSD"] = None  # as the webui: ENSD is written only where the sampler draws later noise
        if req.subseed_strength > 0:
            extra["Variation seed"] = subseed
            extra["Variation seed strength"] = req.subseed_strength
        if req.mask is not None:
            extra["Mask blur"] = req.mask_blur
            extra["Masked content"] = FILL_NAMES[req.inpainting_fill]
            if req.inpaint_full_res:
                extra["Inpaint area"] = "Only masked"
                extra["Masked area padding"] = req.inpaint_full_res_padding
            if req.inpainting_mask_invert:
                extra["Mask mode"] = "Inpaint not masked"
        if req.init_image is not None and req.resize_mode:
            extra["Resize mode"] = RESIZE_NAMES[req.resize_mode]
        if req.token_merging_ratio:  # the webui's keys and rule: the hires one only when hires fix runs
            extra["Token merging ratio"] = req.token_merging_ratio
        if req.enable_hr and (req.token_merging_ratio_hr or req.token_merging_ratio):
            extra["Token merging ratio hr"] = req.token_merging_ratio_hr or req.token_merging_ratio
        if req.enable_hr:
            if req.hr_resize_x or req.hr_resize_y:
                w2, h2 = req.hires_size()
                extra["Hires resize"] = f"{w2}x{h2}"
            else:
                extra["Hires upscale"] = req.hr_scale
            if req.hr_second_pass_steps:
                extra["Hires steps"] = req.hr_second_pass_steps
            extra["Hires upscaler"] = req.hr_upscaler
        return extra

    @staticmethod
    def _added_cond_fn(model: LoadedModel):
        """SDXL's micro-conditioning as the webui sets it: original = target = image size, crop 0,0."""
        if not model.family.id.startswith("sdxl"):
            return None

        def added(cond: Conditioning, n: int, h: int, w: int) -> dict[str, torch.Tensor]:
            if model.family.id == "sdxl-refiner":
                ids = [h, w, 0, 0, 6.0]  # aesthetic score 6 (the webui's default for the positive side)
            else:
                ids = [h, w, 0, 0, h, w]
            time_ids = torch.tensor([ids], dtype=torch.float32, device=model.device).expand(n, -1)
            return {"text_embeds": cond.pooled.expand(n, -1), "time_ids": time_ids}

        return added

    def _finish(self, req: GenerationRequest, seed: int, image: Image.Image, model: LoadedModel, model_hash: str,
                schedule: str, output_dir: Path | None, extra: dict[str, object] | None = None, *,
                chunks: dict[str, str] | None = None) -> GeneratedImage:
        infotext = build_infotext(
            req, seed=seed, model_name=model.name, model_hash=model_hash, schedule_label=schedule,
            extra={**(extra or {}), "RNG": req.randn_source}, version=darkroom.__version__,
        )
        png = encode_png(image, infotext, chunks)
        path = None
        if output_dir is not None:
            fmt = (req.output_format or "png").lower()
            data = png if fmt == "png" else encode_file(
                image, infotext, fmt, quality=req.output_quality or 80, lossless=bool(req.output_lossless))
            path = str(write_numbered(output_dir, seed, data, SUFFIXES[fmt]))
        return GeneratedImage(seed=seed, infotext=infotext, png=png, path=path)

    def apply_preset(self, req: GenerationRequest) -> GenerationRequest:
        """Fill sampler/schedule/steps/CFG from `req.preset` where the request left them unset
        (darkroom/engine/presets.py); "auto" detects the preset from the LoRAs and the checkpoint."""
        if req.preset is None:
            return req
        if req.preset.strip().lower() != presets.AUTO:
            return presets.apply_preset(req)
        return presets.apply_preset(req, self.detect_preset(req))

    def detect_preset(self, req: GenerationRequest):
        """The few-step preset the request's LoRAs or checkpoint need (presets.Detection), or None."""
        loras = []
        for tag in extract_lora_tags(req.prompt)[1]:
            if tag.unet_weight == 0:
                continue
            try:
                meta = self.loras.resolve(tag.name).metadata
            except DarkroomError:  # a missing or damaged LoRA is reported when it is applied
                meta = {}
            loras.append((tag.name, meta))
        try:
            path = self.model_path(req)
            metadata = read_header(path).metadata if path.suffix.lower() == ".safetensors" else {}
        except (DarkroomError, OSError):  # reported when the model is loaded
            path, metadata = None, {}
        return presets.detect(loras=loras, checkpoint=path, metadata=metadata)


def write_numbered(folder: Path, seed: int, data: bytes, suffix: str = ".png") -> Path:
    """Write `NNNNN-seed.png` (or .jpg, .webp) atomically (temp file, then rename) with the next free number."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError.wrap(e, folder) from None
    numbers = [int(p.name.split("-", 1)[0]) for p in folder.iterdir()
               if p.suffix in OUTPUT_SUFFIXES and p.name.split("-", 1)[0].isdigit()]
    number = max(numbers, default=-1) + 1
    while True:
        target = folder / f"{number:05d}-{seed}{suffix}"
        if not target.exists():
            break
        number += 1
    return write_atomic(target, data)


def write_atomic(target: Path, data: bytes) -> Path:
    """Write `target` through a temp file and a rename, so a full disk never leaves half an image.

    On failure the temp file is removed and nothing else is touched; a full disk, a quota, a
    read-only or forbidden folder raise StorageError (HTTP 507) naming the folder.
    """
    tmp = target.parent / f".{target.name}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
        tmp.replace(target)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StorageError.wrap(e, target.parent) from None
    return target
