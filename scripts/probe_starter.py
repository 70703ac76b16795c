"""Does the starter model use each kind of word in its prompt? A probe on the training pictures.

For single-object training scenes it denoises the same noisy latent twice: once with a caption that is
true ("a red circle in the top left") and once with one attribute swapped ("... in the bottom right",
"a blue circle ...", "a red square ..."). If the model reads that attribute, the swapped caption must
predict the clean latent worse; a gap near zero means the word is ignored. The noisiest steps matter
most: that is where sampling decides the layout.

--relations probes two-object scenes instead ("a red circle above a blue square"): with the objects
swapped ("a blue square above a red circle", which binds each object to the other place) and with the
relation on the other axis ("... left of ..."). A model that reads the relation but not which object
it binds to shows a gap for the axis and none for the swap.

Usage: .venv/bin/python scripts/probe_starter.py [--model PATH] [--state training/starter/unet.pt] [--relations]
(--state probes the live weights of a training checkpoint instead of the exported EMA weights)
"""

import argparse
import random
from pathlib import Path

import darkroom  # noqa: F401  (offline first)

# isort: split
import torch
from diffusers import DDPMScheduler

from darkroom.models.configs import scheduler_config
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.models.starter import STARTER_FILE
from darkroom.starter_training import scenes
from darkroom.text.tokenizer import load_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
OTHER_AXIS = {"above": "left of", "below": "right of", "left of": "above", "right of": "below"}
TIMESTEPS = (999, 950, 900, 800, 600)


def swapped(obj, kind: str, rng: random.Random) -> tuple[str, str, str]:
    colour, shape, position = obj.colour, obj.shape, obj.position
    if kind == "position":
        position = " ".join(OPPOSITE[w] for w in position.split())
    elif kind == "colour":
        colour = rng.choice([c for c in scenes.COLOURS if c != colour])
    else:
        shape = rng.choice([s for s in scenes.SHAPES if s != shape])
    return colour, shape, position


def x0_error(unet, t: int, a: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor) -> float:
    """Mean squared error of the model's clean-latent estimate at timestep t."""
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    eps = unet(zt, torch.full((len(z0),), t), encoder_hidden_states=ctx).sample
    return (((zt - (1 - a).sqrt() * eps) / a.sqrt() - z0) ** 2).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=STARTER_FILE)
    ap.add_argument("--state", type=Path, default=None, help="a train_starter.py unet.pt whose live weights to probe")
    ap.add_argument("--pool", type=Path, default=ROOT / "training" / "starter" / "latents.pt")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--relations", action="store_true", help="probe two-object scenes: binding and axis")
    args = ap.parse_args()
    torch.manual_seed(7)
    model = load_checkpoint(args.model, LoadOptions())
    unet, text = model.unet.float().eval(), model.text_encoders[0].model.float().eval()
    if args.state:
        state = torch.load(args.state, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
    pool = torch.load(args.pool, weights_only=False)
    tokenizer = load_clip_tokenizer()
    alphas = DDPMScheduler.from_config(scheduler_config(False)).alphas_cumprod
    rng = random.Random(7)
    two = args.relations
    picks = [i for i, s in enumerate(pool["scenes"])
             if (len(s.objects) == 2 if two else len(s.objects) == 1 and s.objects[0].position != "centre")]
    idx = rng.sample(picks, args.n)
    z0 = pool["latents"][idx, :4].float() * pool["scale"]
    noise = torch.randn_like(z0)

    def encode(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text(input_ids=ids).last_hidden_state

    chosen = [pool["scenes"][i] for i in idx]
    with torch.no_grad():
        if two:
            def say(a, relation: str, b) -> str:
                return f"a {a.colour} {a.shape} {relation} a {b.colour} {b.shape}"

            true_ctx = encode([say(s.objects[0], s.relation, s.objects[1]) for s in chosen])
            swaps = {
                "objects swapped": encode([say(s.objects[1], s.relation, s.objects[0]) for s in chosen]),
                "other axis": encode([say(s.objects[0], OTHER_AXIS[s.relation], s.objects[1]) for s in chosen]),
            }
        else:
            objs = [s.objects[0] for s in chosen]
            true_ctx = encode([f"a {o.colour} {o.shape} in the {o.position}" for o in objs])
            swaps = {k: encode(["a {} {} in the {}".format(*swapped(o, k, rng)) for o in objs])
                     for k in ("position", "colour", "shape")}
        width = max(10, *(len(k) for k in swaps))
        print("x0 error with the true caption, and how much worse with the change (higher: the words are used)")
        print(f"{'t':>5} {'true':>8} " + " ".join(f"{k:>{width}}" for k in swaps))
        for t in TIMESTEPS:
            base = x0_error(unet, t, alphas[t], z0, noise, true_ctx)
            gaps = [x0_error(unet, t, alphas[t], z0, noise, ctx) - base for ctx in swaps.values()]
            print(f"{t:>5} {base:8.4f} " + " ".join(f"{g:+{width}.4f}" for g in gaps), flush=True)


if __name__ == "__main__":
    main()
