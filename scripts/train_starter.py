"""Train Darkroom's built-in starter model from scratch on drawn scenes (CPU, resumable).

The model has the Stable Diffusion 1.x architecture at small widths (CLIP text encoder with
the real tokenizer, UNet2DConditionModel with cross-attention, AutoencoderKL with 4 latent
channels) and is exported in the SD1 single-file layout, so Darkroom's ordinary loader runs
it. Phases, each resumable from its own checkpoint in --work:

  vae     train the autoencoder on rendered scenes (reconstruction + a small KL term)
  latents encode a pool of training scenes once (their captions are re-drawn every epoch)
  unet    train text encoder + UNet jointly with the SD noise schedule (eps prediction),
          captions dropped 10% of the time so classifier-free guidance works; EMA weights
  decoder (optional, --decoder-steps) fine-tune the VAE decoder alone on whole scenes, objects
          weighted 5x; the encoder, and so the latent space the UNet learnt, does not move
  export  write the EMA weights as darkroom/assets/starter/darkroom-starter.safetensors (fp16)

Layout options for the unet phase (used for the position fine-tune, see docs/starter-training.md):
--high-t puts part of each batch at the noisiest timesteps, --snr-weight-cap weights the eps loss
towards v-prediction's so those steps count, and --leak-free trains some of them on noise with no
trace of the picture, as the first sampling step sees it (SD1's schedule never reaches zero SNR).
--partial-captions leaves the colour or the shape out of some captions ("a circle on the left"),
so position words cannot be learnt per colour-shape pair.

Relation options (tried for "a red circle above a blue square", whose objects come out swapped; see
docs/starter-notes.md): --two-objects sets the share of two-object scenes in each batch,
--text-lr-mult the text encoder's own learning rate, --bind-aux a training-only head that must read
from the caption which colour is at the top/left, and --bind-pretrain trains the text encoder on that
alone first, holding its hidden states near their start (--bind-keep). --layout-aux adds a training-only
linear head that must read, from the UNet's mid-block features at the noisy timesteps, which colour is in
each cell of the picture (scripts/starter_layout.py), so "which colour goes where" gets a direct loss.

Every phase appends to --work/log.jsonl (step, loss, seconds); `--until-minutes` stops a
phase cleanly (checkpoint written) so training can be spread over several sessions.

Usage: .venv/bin/python scripts/train_starter.py all --work training/starter [--until-minutes 50]
"""

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers/transformers read it)

# isort: split
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from darkroom.models.configs import scheduler_config
from darkroom.starter_training import scenes
from darkroom.testing.ldm_export import pipeline_to_ldm, save_ldm_checkpoint
from darkroom.text.tokenizer import load_clip_tokenizer

# isort: split
import starter_layout  # scripts/ is on the path when this file runs as a script

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "darkroom" / "assets" / "starter" / "darkroom-starter.safetensors"
SIZE = 128
SEED = 20261122

# 8x downsampling as in real SD (128 px -> 16x16x4 latents), so every size rule carries over
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
    block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE, scaling_factor=1.0,
)
TEXT_CONFIG = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
    num_attention_heads=4, hidden_act="quick_gelu", projection_dim=128, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# 16x16 -> 8x8 -> 4x4 latents; cross-attention at 8x8 and 4x4 only (where layout is decided):
# 0.5 s per batch of 48 on 2 cores, where attention at 16x16 too costs 0.8 s
UNET_CONFIG = dict(
    sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
DECODER_LR = 2e-4  # peak of the decoder phase's cosine schedule
CROP = 64  # the VAE (fully convolutional) trains on 64 px crops of 128 px scenes: 4x cheaper, same scale


class Log:
    def __init__(self, work: Path):
        self.path = work / "log.jsonl"
        self.start = time.time()

    def write(self, **row) -> None:
        row["time"] = round(time.time(), 1)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def deadline_passed(args, t0: float) -> bool:
    return args.until_minutes is not None and time.time() - t0 > args.until_minutes * 60


def load_exported(path: Path) -> dict:
    """Weights of an exported starter file (through Darkroom's own loader), to continue training
    from the committed model when the optimizer checkpoints of an earlier machine are gone."""
    from darkroom.models.header import read_header
    from darkroom.models.loader import LoadOptions, load_checkpoint

    model = load_checkpoint(path, LoadOptions())
    return {"unet": model.unet.state_dict(), "text": model.text_encoders[0].model.state_dict(),
            "vae": model.vae.state_dict(), "scale": model.vae.config.scaling_factor,
            "steps": int(read_header(path).metadata.get("darkroom_train_steps", 0))}


def full_scenes(rng: random.Random, count: int) -> torch.Tensor:
    """`count` training scenes rendered at the native SIZE, uncropped."""
    examples = [scenes.sample_example(rng, split="train") for _ in range(count)]
    return to_tensor([scenes.render(e.scene, size=SIZE, jitter_seed=rng.randrange(1 << 30)) for e in examples])


def scene_crops(rng: random.Random, count: int) -> torch.Tensor:
    """`count` training scenes rendered at full size, each cut to a random CROP-pixel window."""
    full = full_scenes(rng, count)
    crops = []
    for img in full:
        top, left = rng.randrange(0, SIZE - CROP + 1, 8), rng.randrange(0, SIZE - CROP + 1, 8)
        crops.append(img[:, top:top + CROP, left:left + CROP])
    return torch.stack(crops)


# --- phase 1: VAE ---------------------------------------------------------------------------------

def train_vae(args, log: Log, t0: float) -> AutoencoderKL:
    ckpt = args.work / "vae.pt"
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=4e-4, weight_decay=0.0)
    step, rng, state = 0, random.Random(SEED), {}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
    elif args.init_from:
        vae.load_state_dict(load_exported(args.init_from)["vae"])
        step = args.vae_steps  # the exported VAE is the finished one: the latent space must not move
    vae.train()
    while step < args.vae_steps and not deadline_passed(args, t0):
        x = scene_crops(rng, args.vae_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
            recon = vae.decode(z).sample
        rec = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x)
        kl = posterior.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log.write(phase="vae", step=step, loss=round(rec.item(), 5), kl=round(kl.item(), 3))
            print(f"vae {step}/{args.vae_steps} rec {rec.item():.4f} kl {kl.item():.2f}", flush=True)
        if step % 200 == 0:
            save(ckpt, **{**state, "model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng})
    # keep what else the file holds (the decoder phase's step and optimizer): a rerun must not redo it
    save(ckpt, **{**state, "model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng})
    return vae.eval()


def object_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights: 5x on pixels unlike the (flat) background, so small objects count."""
    corner = x[:, :, :1, :1]
    unlike = (x - corner).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + 4.0 * unlike.float()


def train_decoder(args, vae: AutoencoderKL, log: Log, t0: float) -> AutoencoderKL:
    """Fine-tune the decoder alone: the encoder (and so the UNet's latent space) stays fixed.

    Unlike the VAE phase it trains on whole SIZE-pixel scenes, the size the model generates at: the
    VAE's mid-block self-attention sees four times as many positions there as in a 64 px crop, and the
    crop-trained decoder shifted colours at full size (a gray star decoded blue).
    """
    ckpt = args.work / "vae.pt"
    state = torch.load(ckpt, weights_only=False)
    step = state.get("decoder_step", 0)
    rng = state.get("decoder_rng") or random.Random(SEED + 4)
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=DECODER_LR, weight_decay=0.0)
    if "decoder_opt" in state:
        opt.load_state_dict(state["decoder_opt"])
    vae.decoder.train()

    def checkpoint():
        save(ckpt, **{**state, "model": vae.state_dict(), "decoder_step": step, "decoder_rng": rng,
                      "decoder_opt": opt.state_dict()})

    while step < args.decoder_steps and not deadline_passed(args, t0):
        for g in opt.param_groups:  # cosine to zero, so the exported decoder is a settled one, not a noisy step
            g["lr"] = DECODER_LR * 0.5 * (1 + math.cos(math.pi * step / args.decoder_steps))
        x = full_scenes(rng, args.decoder_batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            z = vae.encode(x).latent_dist.sample()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            recon = vae.decode(z).sample
        w = object_weights(x)
        loss = ((recon.float() - x) ** 2 * w).mean() + 0.5 * ((recon.float() - x).abs() * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            log.write(phase="decoder", step=step, loss=round(loss.item(), 5))
            print(f"decoder {step}/{args.decoder_steps} loss {loss.item():.4f}", flush=True)
        if step % 200 == 0:
            checkpoint()
    checkpoint()
    vae.requires_grad_(False)
    return vae.eval()


# --- phase 2: latent pool -------------------------------------------------------------------------

@torch.no_grad()
def encode_pool(args, vae: AutoencoderKL, log: Log) -> dict:
    """Latent mean and std of `--pool` training scenes; captions are drawn afresh each time."""
    path = args.work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = random.Random(SEED + 1)
    all_scenes, latents = [], []
    for start in range(0, args.pool, 64):
        batch = [scenes.sample_example(rng, split="train").scene for _ in range(min(64, args.pool - start))]
        x = to_tensor([scenes.render(s, size=SIZE, jitter_seed=rng.randrange(1 << 30)) for s in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            dist = vae.encode(x).latent_dist
        latents.append(torch.cat([dist.mean.float(), dist.std.float()], dim=1).half())
        all_scenes.extend(batch)
    lat = torch.cat(latents)
    mean_only = lat[:, :4].float()
    scale = 1.0 / mean_only.std().item()
    pool = {"scenes": all_scenes, "latents": lat, "scale": scale}
    torch.save(pool, path)
    log.write(phase="latents", count=len(all_scenes), scale=scale)
    print(f"encoded {len(all_scenes)} scenes, latent scale {scale:.4f}", flush=True)
    return pool


# --- phase 3: text encoder + UNet -----------------------------------------------------------------

def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def sample_timesteps(args, n: int) -> torch.Tensor:
    """Uniform timesteps, with `--high-t` of the batch drawn from [--high-t-from, 1000) instead.

    The layout of a picture (where the object goes) is decided in the first, noisiest sampling steps;
    uniform sampling spends few steps there, and eps-prediction gives them almost no loss (see below).
    """
    t = torch.randint(0, 1000, (n,))
    high = torch.rand(n) < args.high_t
    t[high] = torch.randint(args.high_t_from, 1000, (int(high.sum()),))
    return t


def loss_weights(args, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-sample weights on the eps loss: 1 + 1/SNR (the v-prediction weighting), capped at --snr-weight-cap.

    In image terms the plain eps loss weighs an error in the predicted picture by SNR, which is ~0.005 at
    t=999: the model never learns to take the layout from the caption there and reads it off the noise
    instead. A cap of 0 keeps the plain eps loss.
    """
    if args.snr_weight_cap <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return (1 + 1 / snr).clamp(max=args.snr_weight_cap)


def training_caption(args, scene, rng: random.Random) -> str:
    """A full caption, or with --partial-captions one without colour or shape, which makes each word
    mean the same whatever it is paired with (held-out colour-shape pairs are placed worse than seen ones)."""
    if args.partial_captions and rng.random() < args.partial_captions:
        return scenes.partial_caption(scene, rng)
    return scenes.caption(scene, rng)


def binding_loss(aux: torch.nn.Linear, pooled: torch.Tensor, batch: list, captions: list[str]) -> torch.Tensor:
    """Cross-entropy of the colours the head reads at the top/left and bottom/right of two-object scenes."""
    rows, target = [], []
    for k, (scene, text) in enumerate(zip(batch, captions, strict=True)):
        if text and len(scene.objects) == 2:
            a, b = scene.objects if scene.relation in ("above", "left of") else scene.objects[::-1]
            rows.append(k)
            target.append([scenes.COLOURS.index(a.colour), scenes.COLOURS.index(b.colour)])
    if not rows:
        return pooled.sum() * 0.0
    logits = aux(pooled[rows].float()).view(len(rows) * 2, len(scenes.COLOURS))
    return F.cross_entropy(logits, torch.tensor(target).view(-1))


def pretrain_binding(args, text, aux, tokenizer, pool: dict, rng: random.Random, log: Log) -> None:
    """Train the text encoder on the binding loss first, without the UNet (~0.2 s a step). Jointly, at the
    UNet's learning rate, it stays on a plateau (it knows both colours, not which is where) for thousands
    of steps; alone, at 1e-3, it leaves the plateau after a few hundred. Its hidden states are held close
    to where they started (on any caption), so the UNet can still read what it has learnt."""
    start = copy.deepcopy(text).eval().requires_grad_(False)
    pairs = [sc for sc in pool["scenes"] if len(sc.objects) == 2]
    params = [p for p in text.parameters() if p.requires_grad] + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for step in range(1, args.bind_pretrain + 1):
        batch = [rng.choice(pairs) for _ in range(32)] + [rng.choice(pool["scenes"]) for _ in range(32)]
        captions = [training_caption(args, sc, rng) for sc in batch]
        ids = tokenize(tokenizer, captions)
        encoded = text(input_ids=ids)
        with torch.no_grad():
            before = start(input_ids=ids).last_hidden_state
        bind = binding_loss(aux, encoded.pooler_output, batch, captions)
        drift = ((encoded.last_hidden_state - before) ** 2).mean()
        loss = bind + args.bind_keep * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.write(phase="bind-pretrain", step=step, bind=round(bind.item(), 4), drift=round(drift.item(), 5))
            print(f"bind pretrain {step}/{args.bind_pretrain} bind {bind.item():.3f} drift {drift.item():.4f}",
                  flush=True)


def train_unet(args, pool: dict, log: Log, t0: float):
    ckpt = args.work / "unet.pt"
    torch.manual_seed(SEED + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    ema_unet = UNet2DConditionModel(**UNET_CONFIG)
    ema_text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    # the token embedding stays at its random init: 49408 x 128 rows, of which the scene
    # vocabulary uses ~100; the layers above learn to read them (and Adam skips 6.3M params)
    text.get_input_embeddings().weight.requires_grad_(False)
    # --bind-aux: a training-only head that reads, from the caption's final (EOS) state, which colour is at
    # the top/left of a two-object scene and which at the bottom/right; it is not exported
    aux = torch.nn.Linear(TEXT_CONFIG["hidden_size"], 2 * len(scenes.COLOURS)) if args.bind_aux else None
    # --layout-aux: a training-only linear head on the mid-block features (see scripts/starter_layout.py)
    head = starter_layout.FeatureHead(UNET_CONFIG["block_out_channels"][-1]) if args.layout_aux else None
    heads = [m for m in (aux, head) if m is not None]
    params = [p for p in list(unet.parameters()) + list(text.parameters()) if p.requires_grad]
    if args.text_lr_mult == 1 and not heads:  # one group, as the saved states of the first runs have
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW([
            {"params": [p for p in unet.parameters() if p.requires_grad], "mult": 1.0},
            {"params": [p for p in text.parameters() if p.requires_grad], "mult": args.text_lr_mult},
            # the layout head is a fresh linear probe: it must catch up with the features it reads
            *({"params": list(m.parameters()), "mult": 10.0 if m is head else 1.0} for m in heads),
        ], lr=args.lr, weight_decay=0.01)
        params += [p for m in heads for p in m.parameters()]
    step, rng, base_steps = 0, random.Random(SEED + 3), 0
    tokenizer = load_clip_tokenizer()
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        base_steps = state.get("base_steps", 0)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        if aux is not None:
            aux.load_state_dict(state["aux"])
        if head is not None:
            head.load_state_dict(state["head"])
    else:
        if args.init_from:
            init = load_exported(args.init_from)
            unet.load_state_dict(init["unet"])
            text.load_state_dict(init["text"])
            base_steps = init["steps"]
        if aux is not None and args.bind_pretrain:
            pretrain_binding(args, text, aux, tokenizer, pool, rng, log)
        ema_unet.load_state_dict(unet.state_dict())
        ema_text.load_state_dict(text.state_dict())
    unet.train()
    text.train()
    noise_sched = DDPMScheduler.from_config(scheduler_config(False))
    alphas = noise_sched.alphas_cumprod
    n = len(pool["scenes"])
    scale = pool["scale"]
    pairs = [i for i, sc in enumerate(pool["scenes"]) if len(sc.objects) == 2]
    singles = [i for i, sc in enumerate(pool["scenes"]) if len(sc.objects) == 1]
    if head is not None:
        maps = starter_layout.pool_colour_maps(pool, SIZE // 8, SEED + 1)
        backgrounds = torch.tensor([scenes.COLOURS.index(sc.background) for sc in pool["scenes"]])
        mid = {}
        unet.mid_block.register_forward_hook(lambda module, inputs, output: mid.__setitem__("features", output))

    def layout_term(t, idx, captions):
        """How well the mid-block features say which colour is in each cell, on captioned noisy samples."""
        rows = [k for k in range(len(idx)) if captions[k] and t[k] >= args.layout_from]
        if not rows:
            return mid["features"].sum() * 0.0
        scenes_ = [idx[k] for k in rows]
        target = starter_layout.cell_targets(maps[scenes_], mid["features"].shape[-1])
        return starter_layout.layout_loss(head(mid["features"][rows]), target, backgrounds[scenes_],
                                          args.layout_object_weight)

    def draw_index() -> int:
        if not args.two_objects:  # the pool's own mix (30% two-object scenes), as the first runs drew it
            return rng.randrange(n)
        return rng.choice(pairs) if rng.random() < args.two_objects else rng.choice(singles)

    def checkpoint():
        save(ckpt, unet=unet.state_dict(), text=text.state_dict(), ema_unet=ema_unet.state_dict(),
             ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, rng=rng, scale=scale,
             base_steps=base_steps, **({"aux": aux.state_dict()} if aux is not None else {}),
             **({"head": head.state_dict()} if head is not None else {}))

    last = time.time()
    while step < args.unet_steps and not deadline_passed(args, t0):
        idx = [draw_index() for _ in range(args.batch)]
        captions = [training_caption(args, pool["scenes"][i], rng) if rng.random() > 0.1 else "" for i in idx]
        stats = pool["latents"][idx].float()
        z0 = (stats[:, :4] + stats[:, 4:] * torch.randn_like(stats[:, :4])) * scale
        noise = torch.randn_like(z0)
        t = sample_timesteps(args, len(idx))
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        free = (t >= args.leak_free_from) & (torch.rand(len(idx)) < args.leak_free)
        if free.any():  # noise that carries no trace of the picture, as the first sampling step sees
            zt[free] = torch.randn_like(zt[free])
            noise[free] = (zt[free] - a[free].sqrt() * z0[free]) / (1 - a[free]).sqrt()
        ids = tokenize(tokenizer, captions)
        lr = args.lr * min(1.0, (step + 1) / 300) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / args.unet_steps))))
        for g in opt.param_groups:
            g["lr"] = max(lr, args.lr * 0.05) * g.get("mult", 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            encoded = text(input_ids=ids)
            context = encoded.last_hidden_state
            pred = unet(zt, t, encoder_hidden_states=context).sample
        per_sample = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(args, alphas[t])).mean()
        bind, total = None, loss  # the log's loss stays the diffusion loss alone, comparable across runs
        if aux is not None:
            bind = binding_loss(aux, encoded.pooler_output, [pool["scenes"][i] for i in idx], captions)
            total = loss + args.bind_aux * bind
        layout = None
        if head is not None:
            layout = layout_term(t, idx, captions)
            total = total + args.layout_aux * layout
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    if pl.requires_grad:
                        pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)
        if step % 25 == 0:
            now = time.time()
            extra = {"bind": round(bind.item(), 4)} if bind is not None else {}
            if layout is not None:
                extra |= {"layout": round(layout.item(), 4)}
            log.write(phase="unet", step=step, loss=round(loss.item(), 5), lr=round(lr, 7),
                      sec_per_step=round((now - last) / 25, 3), **extra)
            shown = "".join(f" {k} {v:.3f}" for k, v in extra.items())
            print(f"unet {step}/{args.unet_steps} loss {loss.item():.4f}{shown} {(now - last) / 25:.2f}s/step",
                  flush=True)
            last = now
        if step % 250 == 0:
            checkpoint()
    checkpoint()
    return ema_unet.eval(), ema_text.eval(), scale, step, base_steps


# --- phase 4: export ------------------------------------------------------------------------------

def export(vae: AutoencoderKL, unet, text, scale: float, out: Path, step: int, base_steps: int = 0) -> Path:
    vae_cfg = dict(vae.config)
    vae_cfg["scaling_factor"] = scale
    configs = {
        "unet": json.loads(unet.to_json_string()), "vae": vae_cfg,
        "text_encoder": json.loads(text.config.to_json_string(use_diff=False)), "text_encoder_2": None,
    }
    configs["vae"] = {k: v for k, v in vae_cfg.items() if not k.startswith("_") or k == "_class_name"}
    ldm = pipeline_to_ldm("sd1", unet=unet.state_dict(), unet_config=configs["unet"], vae=vae.state_dict(),
                          text_encoder=text.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    # UNet steps in all: a run started --init-from an exported model adds to that model's count
    metadata = {"darkroom_model": "darkroom-starter", "darkroom_train_steps": str(base_steps + step),
                "description": "Darkroom's tiny demo model, trained from scratch on synthetic shapes"}
    return save_ldm_checkpoint(out, ldm, dtype=torch.float16, configs=configs, metadata=metadata)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["all", "vae", "latents", "unet", "export"])
    ap.add_argument("--work", type=Path, default=ROOT / "training" / "starter")
    ap.add_argument("--out", type=Path, default=EXPORT)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=40000)
    ap.add_argument("--decoder-steps", type=int, default=0, help="decoder-only fine-tuning before export")
    ap.add_argument("--decoder-batch", type=int, default=8, help="whole scenes per decoder step")
    ap.add_argument("--unet-steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--high-t", type=float, default=0.0, help="fraction of each batch with t >= --high-t-from")
    ap.add_argument("--high-t-from", type=int, default=500)
    ap.add_argument("--snr-weight-cap", type=float, default=0.0,
                    help="weight the eps loss by min(1 + 1/SNR, cap) so the noisy steps that decide layout count")
    ap.add_argument("--leak-free", type=float, default=0.0,
                    help="fraction of samples at t >= --leak-free-from whose noisy input holds no trace of the picture")
    ap.add_argument("--leak-free-from", type=int, default=900)
    ap.add_argument("--partial-captions", type=float, default=0.0,
                    help="fraction of captions that leave out the colour or the shape (training only)")
    ap.add_argument("--two-objects", type=float, default=0.0,
                    help="fraction of each batch drawn from two-object scenes (default: the pool's own 30%%); "
                         "relations are where objects get swapped")
    ap.add_argument("--text-lr-mult", type=float, default=1.0,
                    help="text encoder learning rate = --lr times this (which object a relation puts where "
                         "must come from the text encoder mixing the words)")
    ap.add_argument("--bind-aux", type=float, default=0.0,
                    help="weight of a training-only loss that makes the text encoder say which object of a "
                         "relation is where (the model reads the relation but swaps the objects)")
    ap.add_argument("--bind-pretrain", type=int, default=0,
                    help="with --bind-aux, first train the text encoder on that loss alone for this many steps")
    ap.add_argument("--bind-keep", type=float, default=10.0,
                    help="weight that holds the text encoder's hidden states near their start in --bind-pretrain")
    ap.add_argument("--layout-aux", type=float, default=0.0,
                    help="weight of a training-only loss that reads from the UNet's mid-block features, at "
                         "t >= --layout-from, which colour is where (see scripts/starter_layout.py)")
    ap.add_argument("--layout-from", type=int, default=800)
    ap.add_argument("--layout-object-weight", type=float, default=5.0,
                    help="weight of object cells over background ones in the layout loss")
    ap.add_argument("--until-minutes", type=float, default=None, help="stop cleanly after this long")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from an exported starter file (e.g. the committed one) instead of random weights")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 for these small layers)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work)
    t0 = time.time()
    log.write(phase="start", argv=vars(args) | {"work": str(args.work), "out": str(args.out)})
    vae = train_vae(args, log, t0)
    if args.phase == "vae" or deadline_passed(args, t0):
        return
    pool = encode_pool(args, vae, log)
    if args.phase == "latents":
        return
    unet, text, scale, step, base_steps = train_unet(args, pool, log, t0)
    if args.phase in ("all", "export") and args.decoder_steps:
        vae = train_decoder(args, vae, log, t0)
    if args.phase in ("all", "export"):
        path = export(vae, unet, text, scale, args.out, step, base_steps)
        log.write(phase="export", path=str(path), step=step)
        print(f"exported {path}", flush=True)


if __name__ == "__main__":
    main()
