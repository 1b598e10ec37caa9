"""Procedural images, captions and composed-retrieval queries for the ``shapes`` benchmark.

An image shows one object with five attributes (shape, colour, size, position, background) rendered with
random jitter (offset, scale, shade). Every attribute combination appears ``instances`` times in a gallery,
so a query's ground truths are all instances of the target combination, and every target has distractors
that share all but one attribute with it. A query changes one or two attributes of its reference and its
text names only the change ("make it blue", "change the square to a circle and make it larger"): the text
alone cannot know the unchanged attributes, and the image alone cannot know the change.

Everything is a pure function of the seed: the same seed gives the same attributes, texts and pixels.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def replace(self, **changes: str) -> Attributes:
        values = {a: getattr(self, a) for a in ATTRIBUTES}
        values.update(changes)
        return Attributes(**values)

    def key(self) -> str:
        return "-".join(getattr(self, a) for a in ATTRIBUTES)


def all_combinations() -> list[Attributes]:
    return [Attributes(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)]


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def render(attrs: Attributes, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one object with small random jitter in offset, scale and shade."""
    img = Image.new("RGB", (size, size), _jitter_colour(BACKGROUNDS[attrs.background], rng, 10))
    draw = ImageDraw.Draw(img)
    radius = (0.13 if attrs.size == "small" else 0.27) * size * rng.uniform(0.9, 1.1)
    cx = {"left": 0.25, "center": 0.5, "right": 0.75}[attrs.position] * size + rng.uniform(-2.5, 2.5)
    cy = 0.5 * size + rng.uniform(-6, 6)
    fill = _jitter_colour(COLOURS[attrs.colour], rng)
    if attrs.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif attrs.shape == "square":
        r = radius * 0.88
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif attrs.shape == "triangle":
        pts = [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a)))
               for a in (-90, 30, 150)]
        draw.polygon(pts, fill=fill)
    else:  # star
        pts = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(pts, fill=fill)
    return img


# -- captions (training corpus) ---------------------------------------------------------------------
def caption(attrs: Attributes, rng: random.Random) -> str:
    """A full or partial description of an image, in one of several phrasings."""
    parts = {"size": attrs.size if rng.random() < 0.8 else ("big" if attrs.size == "large" else "little"),
             "colour": attrs.colour, "shape": attrs.shape}
    keep = [a for a in ATTRIBUTES if rng.random() < 0.75] or [rng.choice(ATTRIBUTES)]
    noun = parts["shape"] if "shape" in keep else rng.choice(("shape", "object", "thing"))
    adjectives = " ".join(parts[a] for a in ("size", "colour") if a in keep)
    text = f"a {adjectives} {noun}".replace("  ", " ")
    if "position" in keep:
        text += rng.choice((f" on the {attrs.position}", f" at the {attrs.position}", f" in the {attrs.position}"))
    if "background" in keep:
        text += rng.choice((f" on a {attrs.background} background", f", {attrs.background} background"))
    return rng.choice(("", "a photo of ", "an image of ")) + text.strip()


def subject_attribute(attrs: Attributes) -> tuple[str, str]:
    """A (subject, attribute) split of the full caption, for methods that use one (FTI4CIR)."""
    return (f"{attrs.size} {attrs.colour} {attrs.shape}",
            f"{attrs.position} position on a {attrs.background} background")


# -- modification texts ------------------------------------------------------------------------------
def describe_change(ref: Attributes, attr: str, new: str, rng: random.Random) -> str:
    if attr == "colour":
        return rng.choice((f"make it {new}", f"change the colour to {new}", f"turn it {new}"))
    if attr == "shape":
        return rng.choice((f"change the {ref.shape} to a {new}", f"make it a {new}",
                           f"replace the {ref.shape} with a {new}"))
    if attr == "size":
        return rng.choice(("make it larger", "make it bigger")) if new == "large" else \
            rng.choice(("make it smaller", "shrink it"))
    if attr == "position":
        return rng.choice((f"move it to the {new}", f"put it on the {new}", f"place it at the {new}"))
    return rng.choice((f"change the background to {new}", f"put it on a {new} background"))


_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS,
           "background": tuple(BACKGROUNDS)}


def make_query(ref: Attributes, rng: random.Random) -> tuple[Attributes, str]:
    """A modification of one or two attributes of ``ref``: (target attributes, text)."""
    n_changes = 1 if rng.random() < 0.6 else 2
    attrs = rng.sample(ATTRIBUTES, n_changes)
    changes = {a: rng.choice([v for v in _VALUES[a] if v != getattr(ref, a)]) for a in attrs}
    text = " and ".join(describe_change(ref, a, changes[a], rng) for a in attrs)
    return ref.replace(**changes), text
