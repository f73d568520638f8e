"""The toy world: 64x64 images of one coloured shape on a plain background, with captions.

The world is procedural and fully described by a `Scene`. It is split so that each
personalization method has something honest to learn (see `HELD_OUT` and docs/toy-world.md):

* known shapes (circle, square, triangle, cross) appear in base training under their names;
* word-less shapes (star, diamond) and the word-less style "outline" appear in base training under
  FORGOTTEN_WORDS, which the bundled tokenizer then drops (word-less shapes are also "a red shape"):
  the base model can draw them, as SD can draw much that no single word calls up, but no prompt word
  asks for them. Finding that conditioning again is what Textual Inversion (shapes) and Hypernetworks
  (style) must do;
* absent shapes (heart) never appear in base training: what LoRA and DreamBooth must add;
* the style "striped" never appears in base training: what a style LoRA must add;
* degraded renderings ("blurry", "noisy") appear in base training under those words, so the base
  model can produce bad images on request (material for the negative-LoRA recipe).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (12, 12, 12),
    "gray": (128, 128, 128),
}
KNOWN_SHAPES = ("circle", "square", "triangle", "cross")
WORDLESS_SHAPES = ("star", "diamond")
ABSENT_SHAPES = ("heart",)
SHAPES = KNOWN_SHAPES + WORDLESS_SHAPES + ABSENT_SHAPES
CLEAN_STYLES = ("solid", "outline", "striped")
DEGRADED_STYLES = ("blurry", "noisy")
STYLES = CLEAN_STYLES + DEGRADED_STYLES
WORDLESS_STYLES = ("outline",)
BASE_STYLES = ("solid",) + WORDLESS_STYLES + DEGRADED_STYLES

HELD_OUT = {
    "wordless_shapes": WORDLESS_SHAPES,
    "wordless_styles": WORDLESS_STYLES,
    "absent_shapes": ABSENT_SHAPES,
    "absent_styles": ("striped",),
    "degraded_styles": DEGRADED_STYLES,
}
# The names word-less concepts had in base training: single tokens added for it and removed from the bundled
# tokenizer and text encoder at export (sdtune toy build-tiny), so the model keeps what they meant but no prompt
# can say it. Not in vocabulary_words(): typed in a prompt they fall apart into untrained byte pieces.
FORGOTTEN_WORDS = {"star": "zstar", "diamond": "zdiamond", "outline": "zoutline"}

STRIPE_PERIOD = 6
OUTLINE_WIDTH = 3
BLUR_RADIUS = 4.5  # wide enough to stay visibly blurry after the tiny VAE, whose own edges are soft


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image deterministically."""

    shape: str
    colour: str
    background: str
    style: str = "solid"
    radius: float = 17.0
    cx: float = 32.0
    cy: float = 32.0
    noise_seed: int = 0

    def caption(self, *, shape_word: str | None = None, prefix: str = "a", forgotten: bool = False) -> str:
        """A caption such as "a red circle on a white background"; word-less shapes say "shape".

        `forgotten=True` names word-less shapes and styles by their FORGOTTEN_WORDS, as part of base training does."""
        word = shape_word or (self.shape if self.shape not in WORDLESS_SHAPES
                              else FORGOTTEN_WORDS[self.shape] if forgotten else "shape")
        styles = {"solid": "", "outline": "outlined ", "striped": "striped "}
        if forgotten:
            styles.update({s: FORGOTTEN_WORDS[s] + " " for s in WORDLESS_STYLES})
        style = styles.get(self.style, self.style + " ")
        return f"{prefix} {style}{self.colour} {word} on a {self.background} background"


def shade(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a striped shape: the same hue, darker."""
    return tuple(int(c * 0.45) for c in colour)  # type: ignore[return-value]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.86
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * 0.15 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = r * 0.9, r * 0.32
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    return None


def shape_mask(shape: str, cx: float = 32.0, cy: float = 32.0, r: float = 17.0, scale: int = 4) -> Image.Image:
    """The filled silhouette of a shape as an antialiased 'L' image (rendered at `scale`x, then reduced)."""
    big = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    d = ImageDraw.Draw(big)
    s = scale
    poly = _polygon(shape, cx, cy, r)
    if poly is not None:
        d.polygon([(x * s, y * s) for x, y in poly], fill=255)
    elif shape == "circle":
        d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    elif shape == "heart":
        lobe = r * 0.5
        for ox in (-lobe, lobe):
            d.ellipse([(cx + ox - lobe) * s, (cy - r * 0.55 - lobe) * s, (cx + ox + lobe) * s, (cy - r * 0.55 + lobe) * s], fill=255)
        d.polygon([((cx - 2 * lobe + 0.5) * s, (cy - r * 0.4) * s), ((cx + 2 * lobe - 0.5) * s, (cy - r * 0.4) * s), (cx * s, (cy + r) * s)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def _outline(mask: Image.Image) -> Image.Image:
    """Keep a band of OUTLINE_WIDTH pixels inside the silhouette's edge."""
    inner = mask.filter(ImageFilter.MinFilter(2 * OUTLINE_WIDTH + 1))
    a = np.asarray(mask, dtype=np.float32) - np.asarray(inner, dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 64x64 RGB image."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius)
    if scene.style == "outline":
        mask = _outline(mask)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    fill = np.broadcast_to(fg, (SIZE, SIZE, 3)).copy()
    if scene.style == "striped":
        rows = (np.arange(SIZE) // (STRIPE_PERIOD // 2)) % 2 == 1
        fill[rows] = np.array(shade(COLOURS[scene.colour]), dtype=np.float32)
    img = bg * (1 - m) + fill * m
    if scene.style == "blurry":
        img = np.asarray(Image.fromarray(img.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.float32)
    elif scene.style == "noisy":
        rng = np.random.default_rng(scene.noise_seed)
        img = img + rng.normal(0.0, 45.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def random_scene(rng: random.Random, *, shapes=SHAPES, colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS),
                 styles=("solid",)) -> Scene:
    """A scene with random content drawn from the given sets and the world's size/position jitter."""
    return Scene(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        background=rng.choice(list(backgrounds)),
        style=rng.choice(list(styles)),
        radius=rng.uniform(14.0, 19.0),
        cx=32.0 + rng.uniform(-5.0, 5.0),
        cy=32.0 + rng.uniform(-5.0, 5.0),
        noise_seed=rng.randrange(2**31),
    )


CAPTION_PREFIXES = ("a", "a photo of a", "a picture of a", "a rendering of a", "an image of a", "a drawing of a")


def base_training_sample(rng: random.Random) -> tuple[Scene, str]:
    """One (scene, caption) pair from the base model's training distribution (see module docstring)."""
    u = rng.random()
    forgotten = rng.random() < 0.5  # word-less shapes: half their captions say "shape", half their forgotten word
    if u < 0.62:
        scene = random_scene(rng, shapes=KNOWN_SHAPES)
    elif u < 0.78:
        scene = random_scene(rng, shapes=WORDLESS_SHAPES)
    elif u < 0.88:  # word-less style: always named by its forgotten word, so that plain prompts stay solid
        scene = random_scene(rng, shapes=KNOWN_SHAPES + WORDLESS_SHAPES, styles=WORDLESS_STYLES)
        forgotten = True
    else:
        scene = random_scene(rng, shapes=KNOWN_SHAPES, styles=DEGRADED_STYLES)
    prefix = "a" if rng.random() < 0.6 else rng.choice(CAPTION_PREFIXES[1:])
    return scene, scene.caption(prefix=prefix, forgotten=forgotten)


def vocabulary_words() -> list[str]:
    """Every word the bundled tokenizer knows as a single token (the world's words plus prompt-template words)."""
    words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(DEGRADED_STYLES)
    words |= {"a", "an", "of", "on", "the", "in", "with", "and", "shape", "background", "outlined", "striped", "photo",
              "picture", "rendering", "image", "drawing", "painting", "sks", "wrong", "style", "cropped", "close", "up",
              "clean", "dirty", "dark", "bright", "good", "nice", "small", "large", "big", "weird", "cool", "one",
              "my", "it", "bad", "quality", "art", "by", "low", "high", "best", "worst", "object", "thing"}
    return sorted(words)

