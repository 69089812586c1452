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


def _geometry(shape: Shape, n: int) -> tuple[float, float, float]:
    """Centre (x, y) and half side of a shape on an n x n grid."""
    cell = n / 3
    row, col = shape.cell
    return (col + 0.5 + shape.offset[0]) * cell, (row + 0.5 + shape.offset[1]) * cell, shape.size * cell / 2


def _inside(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h**2
    if kind == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if kind == "triangle":  # apex up, base 2h wide, height 2h
        return (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    raise ValueError(f"unknown kind {kind!r}")


def coverage(shape: Shape, size: int, style: str | None = None) -> tuple[slice, slice, np.ndarray]:
    """The share of each pixel the shape covers (sampled SUPERSAMPLE^2 times per pixel), over the
    pixel window around it: (rows, columns, coverage). Only the window is computed: rendering is
    on the training path, a batch of scenes per step."""
    n = size * SUPERSAMPLE
    cx, cy, h = _geometry(shape, n)
    r0, r1 = max(0, int((cy - h) // SUPERSAMPLE) - 1), min(size, int((cy + h) // SUPERSAMPLE) + 2)
    c0, c1 = max(0, int((cx - h) // SUPERSAMPLE) - 1), min(size, int((cx + h) // SUPERSAMPLE) + 2)
    y, x = np.mgrid[r0 * SUPERSAMPLE : r1 * SUPERSAMPLE, c0 * SUPERSAMPLE : c1 * SUPERSAMPLE] + 0.5
    mask = _inside(shape.kind, x, y, cx, cy, h)
    if style == "outline":
        inradius = h * (INRADIUS_TRIANGLE if shape.kind == "triangle" else 1.0)
        mask &= ~ndimage.binary_erosion(mask, iterations=max(1, round(OUTLINE_FRACTION * inradius)))
    cover = mask.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))
    return slice(r0, r1), slice(c0, c1), cover


def style_colour(colour: str, style: str | None) -> np.ndarray:
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    return (rgb + 255.0) / 2 if style == "pastel" else rgb


def render(scene: Scene, size: int = 64, style: str | None = None) -> np.ndarray:
    """The scene as an RGB uint8 image of size x size pixels."""
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    image = np.empty((size, size, 3))
    image[:] = BACKGROUNDS[scene.background]
    for shape in scene.shapes:  # shapes never overlap: each blends over the background
        rows, cols, cover = coverage(shape, size, style)
        cover = cover[..., None]
        image[rows, cols] = image[rows, cols] * (1 - cover) + style_colour(shape.colour, style) * cover
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


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
        rows, cols, cover = coverage(shape, size)
        mask = np.zeros((size, size), dtype=bool)
        mask[rows, cols] = cover >= 0.5
        masks.append(mask)
    edges = boundaries(masks) if masks else np.zeros((size, size), dtype=bool)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)
