"""Moving shapes: a deterministic procedural video data set.

Every clip shows one solid shape (circle, square, triangle) of one colour (red, green,
blue, yellow) moving in one of eight directions across a plain or lightly textured
grey background, bouncing off the borders. Clips are RGB tensors in ``[-1, 1]`` with
layout ``[C, F, H, W]`` (default 3 x 8 x 32 x 32). Each clip carries its prompt
(``"red circle moving up-left"``) and its attribute indices.

The speed is ~2 px/frame per moving axis at 32 px (scaled with the frame size; 14 px over
8 frames), so the direction is obvious from any two frames. The start position is drawn
on the side the object moves away from, with some slack, so roughly a fifth of the
moving axes bounce off a border; the
direction label is always the *initial* direction of motion.

Generalisation split: the (shape, colour, direction) triples in ``HELD_OUT_COMBOS`` are
never produced by ``split="train"``; every single attribute and every pair of attributes
still occurs in training, only the exact triple is new.

Everything is a pure function of its seed (``numpy.random.Generator``), never the
global RNG.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
DIRECTIONS: tuple[str, ...] = (
    "up", "down", "left", "right", "up-left", "up-right", "down-left", "down-right",
)
# RGB in [-1, 1]
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
# unit step (dx, dy) in image coordinates (y grows downwards)
DIRECTION_VEC: dict[str, tuple[int, int]] = {
    "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}
BACKGROUND_LEVEL = -0.2  # grey, far from every shape colour in every channel
TEXTURE_AMPLITUDE = 0.08


class Attrs(NamedTuple):
    """Attribute indices of one clip: into SHAPES, COLOURS, DIRECTIONS."""

    shape: int
    colour: int
    direction: int


ALL_COMBOS: tuple[Attrs, ...] = tuple(
    Attrs(s, c, d)
    for s, c, d in itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(DIRECTIONS)))
)


def _a(shape: str, colour: str, direction: str) -> Attrs:
    return Attrs(SHAPES.index(shape), COLOURS.index(colour), DIRECTIONS.index(direction))


# Held out of training: six triples, chosen so that each shape, each colour and six of
# the eight directions appear once or twice; all their attribute *pairs* stay seen.
HELD_OUT_COMBOS: tuple[Attrs, ...] = (
    _a("circle", "red", "up-left"),
    _a("square", "green", "right"),
    _a("triangle", "blue", "down"),
    _a("circle", "yellow", "down-right"),
    _a("square", "red", "up"),
    _a("triangle", "yellow", "left"),
)
SEEN_COMBOS: tuple[Attrs, ...] = tuple(a for a in ALL_COMBOS if a not in set(HELD_OUT_COMBOS))


@dataclass(frozen=True)
class ClipConfig:
    frames: int = 8
    height: int = 32
    width: int = 32
    textured: bool = True  # a faint static low-frequency texture on the background

    def __post_init__(self):
        if not 2 <= self.frames <= 64:
            raise ValueError(f"frames must be in [2, 64] (8-16 is the intended range), got {self.frames}")
        if min(self.height, self.width) < 16:
            raise ValueError(f"height and width must be >= 16, got {self.height}x{self.width}")


@dataclass
class Clip:
    video: torch.Tensor  # [C, F, H, W] float32 in [-1, 1]
    prompt: str
    attrs: Attrs
    track: np.ndarray  # [F, 2] true (x, y) centre per frame, pixels


@dataclass
class Batch:
    video: torch.Tensor  # [N, C, F, H, W]
    prompts: list[str]
    attrs: torch.Tensor  # [N, 3] long: shape, colour, direction
    seeds: list[int]


def prompt_of(attrs: Attrs | tuple[int, int, int]) -> str:
    s, c, d = attrs
    return f"{COLOURS[c]} {SHAPES[s]} moving {DIRECTIONS[d]}"


_PROMPT_RE = re.compile(r"^\s*(\w+)\s+(\w+)\s+moving\s+([\w-]+)\s*$")


def parse_prompt(prompt: str) -> Attrs:
    """Inverse of :func:`prompt_of`. Raises ValueError naming the bad word."""
    m = _PROMPT_RE.match(prompt.lower())
    if not m:
        raise ValueError(f"prompt {prompt!r} is not of the form '<colour> <shape> moving <direction>'")
    colour, shape, direction = m.groups()
    for word, vocab, kind in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"), (direction, DIRECTIONS, "direction")):
        if word not in vocab:
            raise ValueError(f"prompt {prompt!r}: unknown {kind} {word!r}; expected one of {list(vocab)}")
    return Attrs(SHAPES.index(shape), COLOURS.index(colour), DIRECTIONS.index(direction))


def object_radius(cfg: ClipConfig) -> float:
    return 0.15 * min(cfg.height, cfg.width)  # 4.8 px at 32


def speed(cfg: ClipConfig) -> float:
    return 2.0 * min(cfg.height, cfg.width) / 32.0  # px per frame along each moving axis


def _bounce(p0: float, v: float, lo: float, hi: float, frames: int) -> np.ndarray:
    """Positions of a point moving at v from p0, reflecting off [lo, hi]."""
    span = hi - lo
    raw = p0 - lo + v * np.arange(frames)
    m = np.mod(raw, 2 * span)
    return lo + np.where(m <= span, m, 2 * span - m)


def _shape_mask(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean [F, H, W] mask for centres cx, cy [F] (pixel centres at integer + 0.5)."""
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # upright isoceles triangle, apex at top; centroid at the centre
        h = 1.9 * r  # height
        top = -2.0 / 3.0 * h
        bottom = 1.0 / 3.0 * h
        half_base = 1.1 * r
        frac = (dy - top) / h  # 0 at apex, 1 at base
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * half_base)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A faint static low-frequency texture [3, H, W] with zero mean."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    tex = np.zeros((3, h, w))
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 2.0, size=2) * 2 * math.pi / np.array([w, h])
        ph = rng.uniform(0, 2 * math.pi)
        amp = rng.uniform(0.5, 1.0, size=3)
        tex += amp[:, None, None] * np.sin(fx * xx + fy * yy + ph)[None]
    tex /= np.abs(tex).max() + 1e-9
    return TEXTURE_AMPLITUDE * tex


def make_clip(attrs: Attrs | tuple[int, int, int], seed: int, config: ClipConfig | None = None) -> Clip:
    """Render one clip of ``attrs`` deterministically from ``seed``."""
    cfg = config or ClipConfig()
    attrs = Attrs(*map(int, attrs))
    shape, colour, direction = SHAPES[attrs.shape], COLOURS[attrs.colour], DIRECTIONS[attrs.direction]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5A17E5]))
    F, H, W = cfg.frames, cfg.height, cfg.width
    r = object_radius(cfg)
    margin = r + 0.5
    lo_x, hi_x, lo_y, hi_y = margin, W - margin, margin, H - margin
    ux, uy = DIRECTION_VEC[direction]
    v = speed(cfg) * rng.uniform(0.9, 1.1)
    travel = v * (F - 1)

    def start(u: int, lo: float, hi: float) -> float:
        if u == 0:
            return rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo))
        # start on the side the object leaves, with slack so some clips bounce
        slack = 0.1 * (hi - lo)
        room = max(hi - lo - travel, 0.0) + slack
        p = lo + rng.uniform(0.0, min(room, hi - lo))
        return p if u > 0 else hi - (p - lo)

    x0, y0 = start(ux, lo_x, hi_x), start(uy, lo_y, hi_y)
    cx = _bounce(x0, ux * v, lo_x, hi_x, F)
    cy = _bounce(y0, uy * v, lo_y, hi_y, F)

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    mask = _shape_mask(shape, cx, cy, r, yy, xx)  # [F, H, W]
    bg = np.full((3, H, W), BACKGROUND_LEVEL + rng.uniform(-0.1, 0.1))
    if cfg.textured:
        bg = bg + _texture(rng, H, W)
    rgb = np.asarray(COLOUR_RGB[colour])[:, None, None, None]
    video = np.where(mask[None], rgb, bg[:, None])  # [3, F, H, W]
    video = np.clip(video, -1.0, 1.0).astype(np.float32)
    return Clip(torch.from_numpy(video), prompt_of(attrs), attrs, np.stack([cx, cy], axis=1))


def combos_for(split: str) -> tuple[Attrs, ...]:
    if split == "train" or split == "seen":
        return SEEN_COMBOS
    if split == "held_out":
        return HELD_OUT_COMBOS
    if split == "all":
        return ALL_COMBOS
    raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")


def sample_attrs(n: int, seed: int, split: str = "train") -> list[Attrs]:
    combos = combos_for(split)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xA77]))
    return [combos[i] for i in rng.integers(0, len(combos), size=n)]


def make_batch(n: int, seed: int, split: str = "train", config: ClipConfig | None = None) -> Batch:
    """``n`` clips with attributes drawn uniformly from the split's combos."""
    attrs = sample_attrs(n, seed, split)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xC11B]))
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]
    clips = [make_clip(a, s, config) for a, s in zip(attrs, seeds)]
    if n == 0:
        cfg = config or ClipConfig()
        video = torch.zeros(0, 3, cfg.frames, cfg.height, cfg.width)
    else:
        video = torch.stack([c.video for c in clips])
    return Batch(video, [c.prompt for c in clips], torch.tensor([list(a) for a in attrs], dtype=torch.long).reshape(n, 3), seeds)
