"""Scenes of the shape world and their captions.

A scene is one to three coloured shapes (circle, square, triangle), each in its own cell of a 3x3
grid, on a plain background. The caption says exactly what the renderer draws, in a fixed grammar:

    a red circle at the top left and a blue square at the bottom right on a white background

so `parse_caption` recovers the scene from a prompt, and the scorer can judge any prompt of this
grammar against an image.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("circle", "square", "triangle")
COLOURS = {  # RGB; far apart from each other and from every background
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (45, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
# (row, column) of the 3x3 grid -> the words of the caption
POSITIONS = {
    (0, 0): "the top left",
    (0, 1): "the top",
    (0, 2): "the top right",
    (1, 0): "the left",
    (1, 1): "the center",
    (1, 2): "the right",
    (2, 0): "the bottom left",
    (2, 1): "the bottom",
    (2, 2): "the bottom right",
}
MAX_SHAPES = 3


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int]  # (row, column) in the 3x3 grid
    size: float = 0.7  # side (or diameter) as a fraction of the cell; not in the caption
    offset: tuple[float, float] = (0.0, 0.0)  # centre's shift from the cell centre, fractions of a cell

    def words(self) -> str:
        return f"a {self.colour} {self.kind} at {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str = "white"

    def caption(self) -> str:
        return " and ".join(s.words() for s in self.shapes) + f" on a {self.background} background"

    @classmethod
    def sample(cls, rng: random.Random, max_shapes: int = MAX_SHAPES) -> Scene:
        """A random scene: shapes in distinct cells, colours differing from each other's where
        possible so a caption never names two identical shapes."""
        count = rng.randint(1, max_shapes)
        cells = rng.sample(sorted(POSITIONS), count)
        colours = rng.sample(sorted(COLOURS), count)
        shapes = tuple(
            Shape(
                kind=rng.choice(KINDS),
                colour=colour,
                cell=cell,
                size=rng.uniform(0.6, 0.8),
                offset=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),  # neighbours stay 2 px apart
            )
            for cell, colour in zip(sorted(cells), colours)  # reading order: captions list shapes top to bottom
        )
        return cls(shapes, rng.choice(sorted(BACKGROUNDS)))


_WORDS_OF_POSITION = {words: cell for cell, words in POSITIONS.items()}
_SHAPE = re.compile(
    r"an? (?P<colour>\w+) (?P<kind>\w+) at (?P<position>the (?:top left|top right|bottom left|bottom right|top|"
    r"bottom|left|right|center))"
)
_BACKGROUND = re.compile(r"on an? (?P<background>\w+) background")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this grammar asks for (default size and offsets); ValueError naming
    what does not parse. Words outside the grammar (a style trigger, say) are ignored."""
    text = caption.lower()
    shapes = []
    for match in _SHAPE.finditer(text):
        colour, kind, position = match["colour"], match["kind"], match["position"]
        if colour not in COLOURS or kind not in KINDS:
            raise ValueError(f"unknown shape {colour!r} {kind!r} in {caption!r}")
        shapes.append(Shape(kind, colour, _WORDS_OF_POSITION[position]))
    background = _BACKGROUND.search(text)
    if not shapes or background is None or background["background"] not in BACKGROUNDS:
        raise ValueError(f"not a shape-world caption: {caption!r}")
    return Scene(tuple(shapes), background["background"])
