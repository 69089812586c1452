"""Drawing scenes: the image, its ControlNet edge map, and the LoRA styles.

Shapes are drawn at 4x and averaged down (anti-aliased edges, as a generated image has). Styles are
what the shape world's LoRAs are trained to add, each visible and each checked by the scorer:

    outline   hollow shapes: only a border of a third of the shape's inradius is coloured
    pastel    every shape colour mixed half and half with white
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from swiftd.shapeworld.scene import BACKGROUNDS, COLOURS, Scene, Shape

STYLES = ("outline", "pastel")
SUPERSAMPLE = 4
OUTLINE_FRACTION = 0.34  # border width as a fraction of the shape's inradius: every kind as hollow
INRADIUS_TRIANGLE = 2 / (1 + 5**0.5)  # inradius / half side of the triangle drawn (base = height)


def shape_mask(shape: Shape, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Boolean mask of the shape on a (size*supersample)^2 grid."""
    n = size * supersample
    cell = n / 3
    row, col = shape.cell
    cx = (col + 0.5 + shape.offset[0]) * cell
    cy = (row + 0.5 + shape.offset[1]) * cell
    h = shape.size * cell / 2
    y, x = np.mgrid[0:n, 0:n] + 0.5
    if shape.kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h**2
    if shape.kind == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape.kind == "triangle":  # apex up, base 2h wide, height 2h
        return (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    raise ValueError(f"unknown kind {shape.kind!r}")


def style_colour(colour: str, style: str | None) -> np.ndarray:
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    return (rgb + 255.0) / 2 if style == "pastel" else rgb


def render(scene: Scene, size: int = 64, style: str | None = None) -> np.ndarray:
    """The scene as an RGB uint8 image of size x size pixels."""
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    n = size * SUPERSAMPLE
    canvas = np.empty((n, n, 3))
    canvas[:] = BACKGROUNDS[scene.background]
    for shape in scene.shapes:
        mask = shape_mask(shape, size)
        if style == "outline":
            half_side = shape.size * n / 6
            inradius = half_side * (INRADIUS_TRIANGLE if shape.kind == "triangle" else 1.0)
            border = max(1, round(OUTLINE_FRACTION * inradius))
            mask &= ~ndimage.binary_erosion(mask, iterations=border)
        canvas[mask] = style_colour(shape.colour, style)
    down = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(down), 0, 255).astype(np.uint8)


def boundaries(masks: list[np.ndarray]) -> np.ndarray:
    """One-pixel inner boundary of each (filled) mask, combined."""
    edges = np.zeros(masks[0].shape, dtype=bool) if masks else np.zeros((0, 0), dtype=bool)
    for mask in masks:
        edges |= mask & ~ndimage.binary_erosion(mask)
    return edges


def edge_map(scene: Scene, size: int = 64) -> np.ndarray:
    """The ControlNet conditioning of a scene: its shapes' outlines, white on black, RGB uint8
    (what an edge detector gives for the rendered image, without its noise)."""
    masks = []
    for shape in scene.shapes:
        fine = shape_mask(shape, size)
        coverage = fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        masks.append(coverage >= 0.5)
    edges = boundaries(masks) if masks else np.zeros((size, size), dtype=bool)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)
