"""IP-Adapter units: a reference picture steers the generation through its CLIP vision embedding.

The files users have (h94's `ip-adapter_sd15`, `ip-adapter_sd15_light`, `ip-adapter-plus_sd15`,
`ip-adapter-plus-face_sd15`, `ip-adapter-full-face_sd15`, `ip-adapter_sdxl`, `ip-adapter_sdxl_vit-h`,
`ip-adapter-plus_sdxl_vit-h`, ...) hold `image_proj.*` (a projection of the CLIP embedding into a few context
tokens) and `ip_adapter.{2i+1}.to_k_ip / to_v_ip` (keys and values for the UNet's i-th cross-attention, counted
as diffusers lists its attention processors: down, up, then mid blocks). The A1111 extension runs them as
ControlNet units (model: the IP-Adapter file, module: `ip-adapter_clip_h` / `ip-adapter_clip_g`, the CLIP vision
tower that embeds the picture), and so does Darkroom:

- The picture is squashed to 224 x 224 (area resize, as the extension) and embedded by the CLIP vision tower
  from a local file (`clip_h.pth` / `clip_g.pth` in the extension's `annotator/downloads/clip_vision`, or
  ComfyUI's and Forge's `models/clip_vision` names); plain adapters project its image embedding, plus and
  full-face ones its penultimate hidden states. The negative prompt's rows get the projection of a zero
  embedding (plain) or of the hidden states of an all-zero picture (plus), as diffusers and the adapters'
  authors do; the extension uses a stored tensor there for the plus models.
- At every UNet call in the unit's start/end window, each cross-attention also attends to those tokens
  with the adapter's keys and values, and adds that attention times the unit's weight before its output
  projection (IP-Adapter's decoupled cross-attention), through forward hooks on the UNet's attention modules
  while a pass samples: the cached UNet is never changed. Several units add their terms.

FaceID adapters (`ip-adapter-faceid_sd15`, `-faceid-plus_sd15`, `-faceid-plusv2_sd15`, `-faceid_sdxl`,
`-faceid-plusv2_sdxl`, the portrait ones) take InsightFace's face embedding of the picture's largest face
(darkroom.control.annotators.insightface, on the user's buffalo_l files), with the preprocessors
`ip-adapter_face_id` and `ip-adapter_face_id_plus` (which also runs CLIP ViT-H on the whole picture, as the
extension does); the negative's rows get the projection of a zero face embedding (and, for Plus, of an all-zero
picture's hidden states). v2 is told from the file name, as the extension does. The LoRA that FaceID files come
with is a separate file the prompt loads (`<lora:ip-adapter-faceid_sd15_lora:0.6>`); the LoRA weights inside
the adapter file itself are not used, as in the extension.
InstantID (`ip-adapter_instant_id_sdxl` with `instant_id_face_embedding`, then its ControlNet
`control_instant_id_sdxl` with `instant_id_face_keypoints` in the next unit, as the extension wants them) takes
the raw embedding of the largest face from InsightFace's antelopev2 files (annotators.instantid) through its
resampler; the ControlNet reads those tokens instead of the prompt (darkroom.control.apply).
Refused by name: PuLID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control import unet_hooks
from darkroom.control.config import Kind, darkroom_fields
from darkroom.control.load import LoadedControlNet
from darkroom.control.unet_hooks import HookSession
from darkroom.errors import InvalidRequest, ModelLoadError

LAYOUT = "ip-adapter"
CLIP_KIND = "clip_vision"  # the extension's annotator/downloads sub-folder
CLIP_FILES = {"h": "clip_h.pth", "g": "clip_g.pth", "l": "clip_vitl.pth"}  # "l": the style adapter's (vision_prompt)
CLIP_NAMES = {"h": "CLIP ViT-H/14", "g": "CLIP ViT-bigG/14", "l": "CLIP ViT-L/14"}
MODULES = {"ip-adapter_clip_sd15": "h", "ip-adapter_clip_sdxl": "g", "ip-adapter_clip_sdxl_plus_vith": "h",
           "ip-adapter-auto": None}
"""The extension's preprocessor keys (labels: ip-adapter_clip_h, ip-adapter_clip_g, ...) and the tower each uses."""
_ENCODER_BY_WIDTH = {"embeds": {1024: "h", 1280: "g"}, "hidden": {1280: "h", 1664: "g"}}
_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
FACE_WIDTH = 512  # InsightFace's ArcFace embedding


def _variant(image: Mapping[str, tuple[int, ...]]) -> tuple[str, int]:
    """("plain" | "full" | "plus" | "faceid" | "faceid-plus", width of the CLIP output it projects: 0 for plain
    FaceID, which projects the face embedding alone); ValueError naming what is refused."""
    if "proj.weight" in image:
        return "plain", int(image["proj.weight"][-1])
    if "proj.3.weight" in image:
        return "full", int(image["proj.0.weight"][-1])
    if "perceiver_resampler.proj_in.weight" in image and "proj.0.weight" in image:
        return "faceid-plus", int(image["perceiver_resampler.proj_in.weight"][-1])
    if "norm.weight" in image and "proj.0.weight" in image and "proj.2.weight" in image:
        return "faceid", 0
    if any(k.startswith("perceiver_resampler.") for k in image):
        raise ValueError("an IP-Adapter FaceID model whose layout is not recognised")
    if "latents" in image and "proj_in.weight" in image:
        width = int(image["proj_in.weight"][-1])
        return ("instantid" if width == FACE_WIDTH else "plus"), width  # InstantID: a resampler over a face
    raise ValueError("an IP-Adapter of a kind Darkroom does not know (PuLID or another)")


def ipadapter_kind(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> Kind | None:
    """The Kind of an IP-Adapter file (None when it is not one); family from the text width its keys take."""
    image = {k[len("image_proj."):]: tuple(v) for k, v in shapes.items() if k.startswith("image_proj.")}
    if not image or not any(k.startswith("ip_adapter.") for k in shapes):
        return None
    try:
        _variant(image)
        context = int(shapes["ip_adapter.1.to_k_ip.weight"][-1])
    except ValueError as e:
        return Kind(False, detail=str(e))
    except (KeyError, IndexError):
        return Kind(False, detail="an IP-Adapter without its first cross-attention's keys")
    family = _FAMILY_BY_CONTEXT.get(context) or darkroom_fields(metadata, "ip_adapter", {"family"}).get("family")
    if family is None:
        return Kind(False, detail=f"an IP-Adapter for a {context}-wide text context no SD family has")
    return Kind(True, LAYOUT, family)


def flatten(data: Mapping) -> dict[str, torch.Tensor]:
    """The {"image_proj": {...}, "ip_adapter": {...}} of the authors' .bin files as flat `image_proj.*` keys."""
    return {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in data[part].items()
            if isinstance(v, torch.Tensor)}


class IPAdapterNet(nn.Module):
    """The image projection (diffusers' module for the variant) and each cross-attention's ip keys and values."""

    def __init__(self, image_proj: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.image_proj = image_proj
        self.to_k_ip = nn.ModuleList(nn.Linear(k.shape[1], k.shape[0], bias=False) for k, _ in layers)
        self.to_v_ip = nn.ModuleList(nn.Linear(v.shape[1], v.shape[0], bias=False) for _, v in layers)
        with torch.no_grad():
            for i, (k, v) in enumerate(layers):
                self.to_k_ip[i].weight.copy_(k)
                self.to_v_ip[i].weight.copy_(v)


@dataclass
class LoadedIPAdapter(LoadedControlNet):
    """An IP-Adapter ready to hook (model: IPAdapterNet)."""

    variant: str = "plain"
    clip_width: int = 0
    shortcut: bool = False  # FaceID Plus v2: the face tokens are added back to the resampler's output
    is_ipadapter: ClassVar[bool] = True
    noun: ClassVar[str] = "IP-Adapter"

    @property
    def hidden_states(self) -> bool:
        """Whether it projects the CLIP tower's penultimate hidden states (plus, full-face, FaceID Plus), not its
        embedding."""
        return self.variant not in ("plain", "faceid", "instantid")

    @property
    def face(self) -> bool:
        """A FaceID or InstantID adapter: it takes InsightFace's face embedding of the picture
        (annotators.insightface, annotators.instantid)."""
        return self.variant.startswith("faceid") or self.variant == "instantid"

    @property
    def encoder(self) -> str | None:
        """"h" or "g": the CLIP vision tower it was trained with (None: a width no released tower has, or plain
        FaceID, which takes none)."""
        return _ENCODER_BY_WIDTH["hidden" if self.hidden_states else "embeds"].get(self.clip_width)


def load_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path, *,
                 dtype: torch.dtype, device) -> LoadedIPAdapter:
    from diffusers import UNet2DConditionModel

    kind = ipadapter_kind({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if kind is None or not kind.supported:
        raise ModelLoadError(f"{path.name}: {kind.detail if kind else 'not an IP-Adapter'}")
    image = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    variant, width = _variant({k: tuple(v.shape) for k, v in image.items()})
    count = len([k for k in tensors if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")])
    try:
        layers = [(tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"], tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
                  for i in range(count)]
        # diffusers' own conversion of the authors' projection keys (it reads nothing of the UNet it is a method of)
        projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, image,
                                                                                      low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{path.name}: the IP-Adapter's weights do not fit its layout ({first})") from None
    net = IPAdapterNet(projection, layers).to(device=device, dtype=dtype).eval()
    net.requires_grad_(False)
    # FaceID Plus v2 differs from v1 only in how it is run; the extension tells them by the file name, as we do
    return LoadedIPAdapter(net, kind.family, path, dtype, torch.device(device), variant=variant, clip_width=width,
                           shortcut=variant == "faceid-plus" and "v2" in path.name.lower())


# --- the CLIP vision tower -------------------------------------------------------------------------------------


def clip_config(shapes: Mapping[str, tuple[int, ...]]):
    """CLIPVisionConfig from a transformers-layout tower's shapes; every released tower has 16 heads, and
    OpenAI's ViT-L (1024 wide) uses quick GELU where LAION's ViT-H and bigG use GELU."""
    from transformers import CLIPVisionConfig

    patch = shapes["vision_model.embeddings.patch_embedding.weight"]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    side = int(round((positions - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision_model.encoder.layers."))
    hidden = int(patch[0])
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=int(shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]),
        num_hidden_layers=layers, num_attention_heads=16, patch_size=int(patch[-1]), image_size=side * int(patch[-1]),
        projection_dim=int(shapes["visual_projection.weight"][0]), layer_norm_eps=1e-5,
        hidden_act="quick_gelu" if hidden == 1024 else "gelu")


def load_clip(path: Path, *, dtype: torch.dtype, device):
    """A CLIPVisionModelWithProjection from a transformers-layout file (the extension's clip_h.pth and
    clip_g.pth, ComfyUI's CLIP-ViT-*.safetensors); a whole CLIP model's text tower is left out."""
    from transformers import CLIPVisionModelWithProjection

    from darkroom.control.annotators.files import load_strict, read_state_dict

    state = {k: v for k, v in read_state_dict(path).items()
             if k.startswith(("vision_model.", "visual_projection."))}
    try:
        config = clip_config({k: tuple(v.shape) for k, v in state.items()})
    except (KeyError, ValueError, IndexError):
        raise ModelLoadError(f"{path.name}: not a CLIP vision model in the transformers layout (no"
                             " `vision_model.embeddings` and `visual_projection`)") from None
    state.pop("vision_model.embeddings.position_ids", None)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    model = load_strict(model, state, path, "CLIP vision model", assign=True)
    embeddings = model.vision_model.embeddings  # its position ids are a buffer the file does not hold
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    return model.to(device=device, dtype=dtype).eval()


def clip_pixels(picture: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
    """The tower's input: the uint8 RGB picture squashed to 224 x 224 (area resize, as the extension), in
    [0, 1], normalised with CLIP's mean and deviation: [1, 3, 224, 224]. `mask` (uint8 HxW, the unit's own mask,
    white = masked) is the extension's CLIP mask: squashed the same way, the normalised input is multiplied by
    (255 - mask) / 255, so the masked part of the picture does not count."""
    from darkroom.control.annotators.imageops import AREA, resize

    x = resize(picture, CLIP_SIZE, CLIP_SIZE, AREA).astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    if mask is not None:
        keep = (255 - resize(np.asarray(mask, np.uint8), CLIP_SIZE, CLIP_SIZE, AREA)).astype(np.float32) / 255.0
        x = x * keep[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def tokens(adapter: LoadedIPAdapter, clip, pixels: torch.Tensor | None,
           face: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt tokens, negative tokens), each [1, T, C]: the adapter's projection of the picture's CLIP output
    and of the unconditional one (a zero embedding, or the hidden states of an all-zero picture). FaceID
    adapters project `face` (InsightFace's normed embedding, [1, 512]) and zeros; FaceID Plus also takes the
    CLIP hidden states, as plus adapters do (`clip`, `pixels`: None for plain FaceID)."""
    if adapter.face:
        return _face_tokens(adapter, clip, pixels, face)
    with torch.no_grad():
        if adapter.hidden_states:
            both = _clip_hidden(adapter, clip, pixels)
        else:
            tower = next(clip.parameters())
            embeds = clip(pixels.to(device=tower.device, dtype=tower.dtype)).image_embeds
            both = torch.cat([embeds, torch.zeros_like(embeds)])
            _check_width(adapter, both.shape[-1])
        projected = adapter.model.image_proj(both.to(adapter.dtype).to(next(adapter.model.parameters()).device))
    if projected.ndim == 2:
        projected = projected[:, None]
    return projected[:1], projected[1:]


def _check_width(adapter: LoadedIPAdapter, width: int) -> None:
    if width != adapter.clip_width:
        raise InvalidRequest(f"{adapter.name} takes a {adapter.clip_width}-wide CLIP output; this CLIP vision"
                             f" model gives {width}: pick the {adapter_module(adapter)} preprocessor")


def _clip_hidden(adapter: LoadedIPAdapter, clip, pixels: torch.Tensor) -> torch.Tensor:
    """The penultimate hidden states of the picture and of an all-zero picture ([2, tokens, width]), checked to
    be as wide as the adapter takes."""
    tower = next(clip.parameters())
    pixels = pixels.to(device=tower.device, dtype=tower.dtype)
    hidden = clip(torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True).hidden_states[-2]
    _check_width(adapter, hidden.shape[-1])
    return hidden


def _face_tokens(adapter: LoadedIPAdapter, clip, pixels, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    proj = adapter.model.image_proj
    param = next(adapter.model.parameters())
    ids = torch.cat([face, torch.zeros_like(face)]).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        if adapter.variant == "faceid":
            projected = proj(ids)
        elif adapter.variant == "instantid":  # the plus resampler over the one face embedding
            projected = proj(ids[:, None])
        else:  # FaceID Plus: diffusers' projection reads the CLIP hidden states from an attribute
            hidden = _clip_hidden(adapter, clip, pixels)
            proj.clip_embeds = hidden.to(device=param.device, dtype=param.dtype)[:, None]
            proj.shortcut, proj.shortcut_scale = adapter.shortcut, 1.0
            try:
                projected = proj(ids)
            finally:
                proj.clip_embeds = None
    return projected[:1], projected[1:]


FACE_MODULES = {"ip-adapter_face_id": None, "ip-adapter_face_id_plus": "h", "instant_id_face_embedding": None}
"""The extension's FaceID and InstantID preprocessors (InsightFace's embedding) and the CLIP tower each also runs."""


def adapter_module(adapter: LoadedIPAdapter) -> str:
    """The preprocessor label an adapter needs (ip-adapter_clip_h / _g, the FaceID ones), or ip-adapter-auto
    when unknown."""
    if adapter.face:
        return {"faceid-plus": "ip-adapter_face_id_plus", "instantid": "instant_id_face_embedding"}.get(
            adapter.variant, "ip-adapter_face_id")
    return {"h": "ip-adapter_clip_h", "g": "ip-adapter_clip_g"}.get(adapter.encoder or "", "ip-adapter-auto")


def encoder_for(module: str, adapter: LoadedIPAdapter, name: str) -> str | None:
    """The tower ("h"/"g"; None: none, plain FaceID) a unit with preprocessor `module` runs; InvalidRequest when
    the preprocessor cannot fit the adapter."""
    if adapter.face or module in FACE_MODULES:
        right = adapter_module(adapter)
        if not adapter.face or module not in (right, "ip-adapter-auto"):
            noun = "an InstantID adapter" if adapter.variant == "instantid" else "a FaceID adapter"
            raise InvalidRequest(f"{name} {'is ' + noun if adapter.face else 'is not a FaceID or InstantID adapter'}:"
                                 f" pick the {right} preprocessor, not {module}")
        return FACE_MODULES[right]
    wanted = MODULES.get(module)
    fits = adapter.encoder
    if wanted is None:
        if fits is None:
            raise InvalidRequest(f"{name}: ip-adapter-auto cannot tell which CLIP vision model this IP-Adapter"
                                 " takes; pick ip-adapter_clip_h or ip-adapter_clip_g")
        return fits
    if fits is not None and fits != wanted:
        raise InvalidRequest(f"{name} was trained with {CLIP_NAMES[fits]}, not {CLIP_NAMES[wanted]}: pick the"
                             f" {adapter_module(adapter)} preprocessor (or ip-adapter-auto)")
    return wanted


# --- running ---------------------------------------------------------------------------------------------------


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attention modules in the order of diffusers' attn_processors (down, up, mid blocks)."""
    from diffusers.models.attention_processor import Attention

    return [m for name, m in unet.named_modules() if isinstance(m, Attention) and name.endswith("attn2")]


class _Session(HookSession):
    """A pass's IP-Adapter units hooked into the UNet's cross-attentions; `control.at` and `control.rows` say
    which step and CFG rows the UNet call is for."""

    def __init__(self, control, units, unet: nn.Module):
        super().__init__(control, units, unet)
        self.cache: dict[tuple, torch.Tensor] = {}

    def install(self) -> None:
        layers = cross_attentions(self.unet)
        for unit in self.units:
            count = len(unit.controlnet.model.to_k_ip)
            if count != len(layers):
                raise InvalidRequest(f"{unit.controlnet.name} has keys for {count} cross-attention layers; the"
                                     f" checkpoint's UNet has {len(layers)} (an IP-Adapter for another model)")
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._hook(index), with_kwargs=True))

    def _rows(self, unit, batch: int, device, dtype) -> torch.Tensor:
        """The unit's tokens for each row of the CFG batch: the negative's for the first n rows when the batch
        has them, the picture's for the prompt's rows."""
        n, uncond = self.control.rows
        key = (id(unit), batch, n, uncond, device, dtype)
        rows = self.cache.get(key)
        if rows is None:
            cond, negative = (t.to(device=device, dtype=dtype) for t in unit.ip_tokens)
            rows = torch.cat([negative.expand(n, -1, -1), cond.expand(batch - n, -1, -1)]) if uncond \
                else cond.expand(batch, -1, -1)
            self.cache[key] = rows
        return rows

    def _region(self, unit, tokens: int, device, dtype) -> torch.Tensor:
        """The unit's region mask at a layer of `tokens` tokens ([1, 1, tokens, 1]): the latent grid scaled by the
        layer's factor, bilinear, as the extension masks the adapter's attention output."""
        lat_h, lat_w = self.control.latent_size
        key = (id(unit), "region", tokens, lat_h, lat_w, device, dtype)
        mask = self.cache.get(key)
        if mask is None:  # once per layer size and pass, not at every call
            factor = (tokens / (lat_h * lat_w)) ** 0.5
            size = (int(lat_h * factor), int(lat_w * factor))
            mask = F.interpolate(unit.region.to(device=device, dtype=torch.float32), size=size, mode="bilinear")
            mask = self.cache[key] = mask.reshape(1, 1, -1, 1).to(dtype)
        return mask

    def _hook(self, index: int):
        def add(attn, args, kwargs, output):
            step, total = self.control.at
            active = [u for u in self.units if u.covers(step, total) and u.weight != 0]
            if not active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            batch = hidden.shape[0]
            query = attn.to_q(hidden)
            heads = attn.heads
            head_dim = query.shape[-1] // heads
            query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
            total_term = None
            for unit in active:
                net = unit.controlnet.model
                rows = self._rows(unit, batch, query.device, net.to_k_ip[index].weight.dtype)
                k = net.to_k_ip[index](rows).to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
                v = net.to_v_ip[index](rows).to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
                term = F.scaled_dot_product_attention(query, k, v) * unit.weight
                if unit.region is not None:  # effective_region_mask, at this layer's token grid
                    term = term * self._region(unit, term.shape[2], term.device, term.dtype)
                total_term = term if total_term is None else total_term + term
            total_term = total_term.transpose(1, 2).reshape(batch, -1, heads * head_dim)
            # to_out is linear: W(a + s b) + c = (W a + c) + W s b, so the term joins after it without a 2nd bias
            return output + F.linear(total_term, attn.to_out[0].weight).to(output.dtype)
        return add


def hooked(control, unet: nn.Module):
    """A context: for the block, `control`'s IP-Adapter units hooked into `unet`'s cross-attentions; removed on
    exit, however the block ends."""
    units = [u for u in control.units if getattr(u.controlnet, "is_ipadapter", False)] if control else []
    return unet_hooks.hooked(_Session(control, units, unet) if units else None)
