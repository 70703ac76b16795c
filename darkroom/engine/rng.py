"""Where the noise comes from: the webui's random sources, so its infotexts reproduce here.

AUTOMATIC1111's webui draws each image's noise from a generator seeded with that image's seed
(seed, seed+1, ... in a batch) on one of three sources, its `randn_source` option ("RNG" in the
infotext):

- "CPU": a torch CPU generator. Darkroom's own default: the same numbers on every machine.
- "GPU": torch on the GPU (the webui's default). NVIDIA GPUs draw with Philox4x32-10, so on a
  machine without CUDA this source uses `Philox` below, which gives NVIDIA's numbers.
- "NV": the webui's own CPU reimplementation of NVIDIA's Philox, the same numbers everywhere.

The first draw is the initial latent noise; later draws (ancestral / SDE sampler steps) continue
the same per-image generators, except that a non-zero eta_noise_seed_delta (ENSD) first reseeds
them with seed + delta, so it changes the sampler's later noise and never the initial noise.

With GPU or NV the sampling itself is the webui's too (darkroom/engine/samplers.py `runner`): the
SDE samplers then take their step noise from `BrownianNoise`, the webui's per-seed Brownian trees.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

SOURCES = ("CPU", "GPU", "NV")

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
# the same values curand uses): round multipliers and the Weyl key increments.
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
# curand's Box-Muller scale factors, as float32 constants (2**-32 and 2**-32 * 2pi)
_INV32 = np.float32(2.3283064e-10)
_INV32_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _philox4x32_10(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Ten Philox rounds over many 128-bit counters at once (uint64 arrays holding 32-bit words)."""
    c0, c1, c2, c3 = counter
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = c0 * _M0, c2 * _M1  # exact: both factors < 2**32
        c0, c1, c2, c3 = (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32
    return [c0, c1, c2, c3]


class Philox:
    """torch.randn as NVIDIA GPUs draw it, on the CPU (and the webui's "NV" source, which is this).

    Element i of a draw is the first Box-Muller normal (s * sin v, as curand_normal4 gives it) of
    Philox4x32-10 subsequence i at counter `offset`, with the 64-bit seed as the key; each draw
    moves the counter on by one, as CUDA torch moves its offset by 4 32-bit words for a tensor
    that fits one grid pass. That covers every latent up to the GPU's grid size (over 100k
    elements on current cards, e.g. 4x128x128); past it CUDA spreads elements differently per card.
    The Box-Muller arithmetic is done as the webui's NV source does it (float64, rounded to float32).
    """

    def __init__(self, seed: int):
        self.seed = int(seed) % 2**64
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        index = np.arange(n, dtype=np.uint64)
        counter = [np.full(n, self.offset & 0xFFFFFFFF, dtype=np.uint64),
                   np.full(n, self.offset >> 32, dtype=np.uint64), index & _MASK32, index >> _SHIFT32]
        self.offset += 1
        x, y, _, _ = _philox4x32_10(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))
        u = x.astype(np.float64) * float(_INV32) + float(_INV32 / np.float32(2))
        v = y.astype(np.float64) * float(_INV32_2PI) + float(_INV32_2PI / np.float32(2))
        out = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)
        return torch.from_numpy(out.reshape(shape))


def normalize_source(source: str) -> str:
    """"cpu" / "Gpu" / "nv" -> the canonical name; ValueError naming the choices otherwise."""
    canonical = str(source).strip().upper()
    if canonical not in SOURCES:
        raise ValueError(f"randn_source {source!r} is not one of CPU, GPU, NV")
    return canonical


class _Draw:
    """One image's generator on one source: `randn(shape)` continues it (CPU tensor)."""

    def __init__(self, source: str, seed: int):
        self.generator: torch.Generator | None = None
        self.philox: Philox | None = None
        if source == "CPU":
            self.generator = torch.Generator("cpu").manual_seed(seed)
        elif source == "GPU" and torch.cuda.is_available():
            self.generator = torch.Generator("cuda").manual_seed(seed)
        else:
            self.philox = Philox(seed)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.philox is not None:
            return self.philox.randn(shape)
        return torch.randn(shape, generator=self.generator, device=self.generator.device).cpu()


def randn(source: str, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One fresh draw of `shape` from a generator seeded `seed` on `source` (CPU float32)."""
    return _Draw(normalize_source(source), seed).randn(shape)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mix seed noise `a` towards variation-seed noise `b` (n, c, h, w) by `t`, exactly as the webui does.

    Its slerp works on one image's (c, h, w) noise with norms and dot products taken along the
    height axis, so every (channel, column) is interpolated on its own arc; when the columns are
    nearly parallel on average it falls back to a linear mix, with the weights the other way round
    (a * t + b * (1 - t)), as the webui has it. Copied in behaviour so variation seeds reproduce.
    """
    out = []
    for x, y in zip(a, b, strict=True):
        dot = ((x / x.norm(dim=1, keepdim=True)) * (y / y.norm(dim=1, keepdim=True))).sum(1)
        if dot.mean() > 0.9995:
            out.append(x * t + y * (1 - t))
            continue
        omega = torch.acos(dot.clamp(-1.0, 1.0))
        so = torch.sin(omega)
        out.append((torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * x + (torch.sin(t * omega) / so).unsqueeze(1) * y)
    return torch.stack(out)


class NoiseStream:
    """The rest of a batch's noise after the initial draw (the webui's ImageRNG.next).

    `next()` is the exact next draw on the source. `generators` are per-image torch generators for
    diffusers' schedulers (`generator=`): for CPU (and GPU on CUDA) the very ones `next()` draws
    from (`exact`); torch cannot express Philox as a generator, so for NV (and GPU without CUDA)
    they are CPU generators seeded the same way, a deterministic stand-in for loops that cannot
    take their step noise from `next()`.
    """

    def __init__(self, draws: list[_Draw], seeds: list[int], shape: tuple[int, ...]):
        self._draws, self.shape = draws, tuple(shape)
        self.exact = all(d.generator is not None for d in draws)
        self.generators: list[torch.Generator] = (
            [d.generator for d in draws] if self.exact else [torch.Generator("cpu").manual_seed(s) for s in seeds])

    def next(self) -> torch.Tensor:
        """The next per-image draw, stacked: (n, *shape) float32 on the CPU."""
        return torch.stack([d.randn(self.shape) for d in self._draws])


@dataclass
class Noise:
    """A batch's noise: per-image generators on the request's source, so it does not depend on the
    batch (a batch of N equals N single runs) and, for CPU and NV, not on the device either.

    `subseeds` with `subseed_strength` > 0 mix in variation-seed noise (slerp); `seed_delta` is the
    webui's eta_noise_seed_delta: the sampler's later draws come from generators seeded seed + delta.
    """

    seeds: list[int]
    subseeds: list[int] = field(default_factory=list)
    subseed_strength: float = 0.0
    source: str = "CPU"
    seed_delta: int = 0

    def __post_init__(self):
        self.source = normalize_source(self.source)

    def start(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, NoiseStream]:
        """The initial noise (n, *shape) and the stream the sampler's later draws come from."""
        draws = [_Draw(self.source, s) for s in self.seeds]
        noise = torch.stack([d.randn(shape) for d in draws])
        if self.subseed_strength > 0 and self.subseeds:
            sub = torch.stack([randn(self.source, s, shape) for s in self.subseeds])
            noise = slerp(self.subseed_strength, noise, sub)
        seeds = self.seeds
        if self.seed_delta:  # the webui reseeds here, after the first draw: the initial noise never changes
            seeds = [(s + self.seed_delta) % 2**64 for s in self.seeds]
            draws = [_Draw(self.source, s) for s in seeds]
        return noise, NoiseStream(draws, seeds, shape)


# torchsde draws every Brownian-tree value with `_randn(size, dtype, device, seed)`: a fresh generator on the
# tree's device seeded from the tree's SeedSequence. The webui's trees live on its GPU, so on a machine without
# CUDA those draws are made with `Philox` instead: set per thread (a ContextVar) around our own trees' calls
# only, everything else (diffusers' DPMSolverSDEScheduler included) keeps torchsde's own draws.
_TREE_DRAW: ContextVar[Callable[[tuple[int, ...], int], torch.Tensor] | None] = ContextVar("tree_draw", default=None)
_TORCHSDE_RANDN: list[Callable] = []


def _tree_randn(size, dtype, device, seed):
    draw = _TREE_DRAW.get()
    if draw is None:
        return _TORCHSDE_RANDN[0](size, dtype, device, seed)
    return draw(tuple(size), int(seed)).to(device=device, dtype=dtype)


def _route_tree_draws() -> None:
    """Let `_TREE_DRAW` replace torchsde's draws (once per process; a no-op while it is unset)."""
    from torchsde._brownian import brownian_interval

    if brownian_interval._randn is not _tree_randn:
        _TORCHSDE_RANDN[:] = [brownian_interval._randn]
        brownian_interval._randn = _tree_randn


class BrownianNoise:
    """The webui's noise for DPM++ SDE, 2M SDE and 3M SDE: one Brownian tree per image seed.

    As the webui's `create_noise_sampler` (k-diffusion's BrownianTreeNoiseSampler, identity transform):
    trees over [sigma_min, sigma_max] of the run's full schedule (lowest non-zero sigma to highest), each
    seeded with its image's seed (not the ENSD-shifted one), so a batch equals single runs; a call
    (sigma, sigma_next) gives the tree's increment between them divided by sqrt(|sigma_next - sigma|), i.e.
    unit-variance noise. The webui builds the trees on its GPU, so their draws are GPU draws: CUDA's own when
    CUDA is here, else `Philox` (the same numbers); `gpu=False` keeps torchsde's CPU draws.
    """

    def __init__(self, seeds: list[int], shape: tuple[int, ...], sigma_min, sigma_max, *, gpu: bool = True,
                 device: torch.device | str = "cpu"):
        import torchsde

        self.device = torch.device(device)
        self._tree_device = torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")
        self._draw = (lambda size, seed: Philox(seed).randn(size)) if gpu and not torch.cuda.is_available() else None
        t0, t1 = torch.as_tensor(sigma_min, dtype=torch.float32), torch.as_tensor(sigma_max, dtype=torch.float32)
        self._sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros(tuple(shape), dtype=torch.float32, device=self._tree_device)
        _route_tree_draws()
        with self._drawing():
            self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    @contextlib.contextmanager
    def _drawing(self):
        token = _TREE_DRAW.set(self._draw)
        try:
            with warnings.catch_warnings():  # float32 rounding can put a query a hair outside the tree
                warnings.filterwarnings("ignore", message=r"Should have t[ab]", category=UserWarning)
                yield
        finally:
            _TREE_DRAW.reset(token)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0 = torch.as_tensor(sigma, dtype=torch.float32).cpu()
        t1 = torch.as_tensor(sigma_next, dtype=torch.float32).cpu()
        sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with self._drawing():
            w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        return (w / (t1 - t0).abs().sqrt().to(w.device)).to(self.device)
