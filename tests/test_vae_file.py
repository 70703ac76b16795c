"""Separate VAE files: both key layouts, fit checks, swapping back, listing and resolving."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from darkroom.errors import InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.models.vae_file import VaeLibrary, load_vae_file, swap_vae
from darkroom.testing.ldm_export import vae_to_ldm
from darkroom.testing.tiny import tiny_configs


@pytest.fixture(scope="module")
def sd1(tiny_model):
    return load_checkpoint(tiny_model("sd1")["path"], LoadOptions())


@pytest.fixture(scope="module")
def perturbed(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny SD1 VAE (diffusers keys) with different decoder weights."""
    g = torch.Generator().manual_seed(5)
    sd = tiny_model("sd1")["state_dicts"]["vae"]
    return {k: (v + torch.randn(v.shape, generator=g) * 0.05 if k.startswith("decoder.") else v).contiguous()
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z / vae.config.scaling_factor).sample


def write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def ldm(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in vae_to_ldm(sd, prefix).items()}


def other_vae(**changes) -> dict[str, torch.Tensor]:
    cfg = tiny_configs("sd1")["vae"] | changes
    return AutoencoderKL(**cfg).state_dict()


@pytest.mark.parametrize("layout", ["ldm", "ldm-prefixed", "diffusers", "diffusers-old-attention",
                                    "diffusers-folder"])
def test_loads_decodes_differently_and_swaps_back(tmp_path, sd1, perturbed, latents, layout):
    if layout == "diffusers-folder":
        module = AutoencoderKL(**tiny_configs("sd1")["vae"])
        module.load_state_dict(perturbed)
        module.save_pretrained(tmp_path / "my-vae")
        path = tmp_path / "my-vae"
    elif layout == "diffusers":
        path = write(tmp_path / "diffusion_pytorch_model.safetensors", perturbed)
    elif layout == "diffusers-old-attention":  # sd-vae-ft-mse and other 2022 files
        names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        old = {}
        for k, v in perturbed.items():
            for new_name, old_name in names.items():
                if ".attentions.0." + new_name in k:
                    k = k.replace(".attentions.0." + new_name, ".attentions.0." + old_name)
                    v = v[:, :, None, None] if v.ndim == 2 and old_name == "query." else v  # some hold 1x1 convs
            old[k] = v.contiguous()
        path = write(tmp_path / "old.safetensors", old)
    else:
        prefix = "first_stage_model." if layout == "ldm-prefixed" else ""
        path = write(tmp_path / "vae.safetensors", ldm(perturbed, prefix))
    vae = load_vae_file(path, like=sd1)
    got = vae.state_dict()
    assert set(got) == set(perturbed)
    assert all(torch.equal(got[k], perturbed[k]) for k in perturbed)
    assert vae.config.scaling_factor == sd1.vae.config.scaling_factor == 0.18215

    own = sd1.vae
    before = decode(sd1.vae, latents)
    with swap_vae(sd1, vae) as model:
        assert model.vae is vae
        swapped = decode(model.vae, latents)
    assert sd1.vae is own
    assert not torch.allclose(swapped, before, atol=1e-3)
    assert torch.equal(decode(sd1.vae, latents), before)


def test_swap_restores_on_error_and_none_is_a_no_op(sd1, perturbed, tmp_path):
    vae = load_vae_file(write(tmp_path / "v.safetensors", perturbed), like=sd1)
    own = sd1.vae
    with pytest.raises(RuntimeError), swap_vae(sd1, vae):
        raise RuntimeError("boom")
    assert sd1.vae is own
    with swap_vae(sd1, None) as model:
        assert model.vae is own


def test_a_whole_checkpoint_gives_its_vae_with_the_models_scaling(tmp_path, sd1, tiny_model):
    """The tiny SDXL checkpoint's VAE has SD1's shapes (as the real ones do): it loads, scaled as SD1."""
    info = tiny_model("sdxl")
    vae = load_vae_file(info["path"], like=sd1)
    assert vae.config.scaling_factor == 0.18215
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in info["state_dicts"]["vae"].items())


@pytest.mark.parametrize(("changes", "says"), [
    ({"latent_channels": 16}, "16 latent channels"),  # an SD3/Flux VAE on an SD1 model
    ({"block_out_channels": (32, 32, 64), "down_block_types": ("DownEncoderBlock2D",) * 3,
      "up_block_types": ("UpDecoderBlock2D",) * 3}, "4x downscale"),
])
def test_a_vae_that_does_not_fit_is_a_clear_error(tmp_path, sd1, changes, says):
    path = write(tmp_path / "big.safetensors", ldm(other_vae(**changes)))
    with pytest.raises(InvalidRequest) as err:
        load_vae_file(path, like=sd1)
    text = str(err.value)
    assert "big.safetensors" in text and sd1.name in text and says in text
    assert "4 latent channels, block widths [32, 64] (2x downscale)" in text


def test_broken_files_say_what_is_wrong(tmp_path, sd1, perturbed):
    path = write(tmp_path / "cut.safetensors", ldm(perturbed))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="cut.safetensors: file is truncated"):
        load_vae_file(path, like=sd1)
    emb = write(tmp_path / "emb.safetensors", {"emb_params": torch.zeros(1, 32)})
    with pytest.raises(ModelLoadError, match="no VAE weights found .this is a textual inversion embedding file"):
        load_vae_file(emb, like=sd1)
    partial = {k: v for k, v in vae_to_ldm(perturbed, "").items() if "mid.attn_1.q" not in k}
    with pytest.raises(ModelLoadError, match="VAE weights do not match"):
        load_vae_file(write(tmp_path / "partial.safetensors", partial), like=sd1)
    pickled = tmp_path / "old.vae.pt"
    torch.save({"state_dict": vae_to_ldm(perturbed, "")}, pickled)
    with pytest.raises(ModelLoadError, match="refuses them by default"):
        load_vae_file(pickled, like=sd1)
    vae = load_vae_file(pickled, like=sd1, allow_pickle=True)
    assert torch.equal(vae.state_dict()["decoder.conv_out.weight"], perturbed["decoder.conv_out.weight"])


def test_library_lists_resolves_and_loads(tmp_path, sd1, perturbed, latents):
    a1111, comfy = tmp_path / "a1111", tmp_path / "comfy"
    home = Home(tmp_path / "home", extra_model_dirs=[a1111, comfy]).ensure()
    ldm_sd = ldm(perturbed)
    mine = write(home.vae / "Mine.safetensors", ldm_sd)
    write(a1111 / "models" / "VAE" / "sub" / "webui.safetensors", ldm_sd)
    write(comfy / "models" / "vae" / "comfy.safetensors", perturbed)
    write(home.checkpoints / "tiny.vae.safetensors", ldm_sd)  # the webui lists <checkpoint>.vae.* too
    module = AutoencoderKL(**tiny_configs("sd1")["vae"])
    module.save_pretrained(home.vae / "folder-vae")
    lib = VaeLibrary(home)
    names = [e.name for e in lib.scan()]
    assert sorted(names) == ["Mine.safetensors", "comfy.safetensors", "folder-vae", "tiny.vae.safetensors",
                             "webui.safetensors"]

    for choice in (None, "", "None", "Automatic", "automatic"):
        assert lib.resolve(choice) is None
    assert lib.resolve("Mine.safetensors").path == mine
    assert lib.resolve("mine").path == mine
    assert lib.resolve(str(mine)).path == mine
    sha = hashlib.sha256(mine.read_bytes()).hexdigest()
    assert lib.resolve(sha[:10]).path == mine
    assert lib.resolve("Automatic", checkpoint=home.checkpoints / "tiny.safetensors").name == "tiny.vae.safetensors"
    with pytest.raises(ModelNotFound, match="no VAE named 'nope'.*Mine.safetensors"):
        lib.resolve("nope")

    loaded = lib.load("mine", sd1)
    assert loaded.infotext() == {"VAE hash": sha[:10], "VAE": "Mine.safetensors"}
    assert lib.load("Mine.safetensors", sd1) is loaded  # read once for a run of generations
    assert lib.load("None", sd1) is None
    folder = lib.load("folder-vae", sd1)
    assert folder.infotext()["VAE"] == "folder-vae" and len(folder.infotext()["VAE hash"]) == 10
    with swap_vae(sd1, loaded.vae):
        assert not torch.allclose(decode(sd1.vae, latents), decode(folder.vae, latents), atol=1e-3)


def test_through_the_engine(tmp_path, tiny_model, engine_factory, perturbed):
    """A generation decoded with a swapped VAE differs; with the VAE swapped back it is the same as before."""
    from darkroom.request import GenerationRequest

    home = Home(tmp_path / "home").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    write(home.vae / "alt.safetensors", ldm(perturbed))
    engine = engine_factory(home)
    req = GenerationRequest(prompt="a red circle", steps=1, width=32, height=32, seed=3, sampler="Euler",
                            cfg_scale=1.0, model="tiny")
    own = engine.generate(req).images[0].png
    model = engine.cache.current
    alt = VaeLibrary(home).load("alt.safetensors", model)
    with swap_vae(model, alt.vae):
        swapped = engine.generate(req).images[0].png
    assert swapped != own
    assert engine.generate(req).images[0].png == own


def test_engine_uses_a_separate_vae_and_records_it(tmp_path, tiny_model, engine_factory, perturbed):
    """`vae=` swaps the decoder in for one request only; the infotext names it as the webui does."""
    import shutil

    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    home = Home(tmp_path / "home").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    write(home.vae / "crisp.safetensors", ldm(perturbed))
    engine = engine_factory(home)
    req = GenerationRequest(prompt="a cat", steps=2, width=32, height=32, seed=1, sampler="Euler")
    plain = engine.generate(req).images[0]
    swapped = engine.generate(req.model_copy(update={"vae": "crisp"})).images[0]
    assert swapped.png != plain.png
    assert "VAE hash: " in swapped.infotext and "VAE: crisp.safetensors" in swapped.infotext
    assert engine.generate(req).images[0].png == plain.png  # the checkpoint's own VAE is back
    from darkroom.errors import DarkroomError

    with pytest.raises(DarkroomError, match="nope"):
        engine.generate(req.model_copy(update={"vae": "nope"}))
