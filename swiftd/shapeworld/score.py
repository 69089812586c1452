"""The scorer: finds the shapes in an image and judges it against a prompt, a control and a style.

Deterministic, no learned model: the background is the colour of the image's border; everything
far enough from it is foreground; each connected foreground component is a shape, whose

    kind      comes from its filled outline: a triangle's top half is light, a square fills its
              bounding box's corners and a circle leaves them empty,
    colour    is the nearest shape colour (plain or pastel) to its median pixel,
    cell      is where its centre falls on the 3x3 grid.

Scores, each in [0, 1]:

    prompt_adherence   requested shapes found with the right kind, colour and cell, over the larger
                       of the requested and found counts (an extra shape costs as much as a miss)
    control_iou        overlap of the found shapes' boundaries with the conditioning edges
                       (intersection over union, a pixel's shift tolerated)
    style              whether most found shapes show the style (hollow for outline, pale for pastel)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from swiftd.shapeworld.render import boundaries, style_colour
from swiftd.shapeworld.scene import COLOURS, Scene

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is a shape's
WEAK_DISTANCE = 30.0  # ... or, when connected to such pixels, beyond this
MIN_AREA = 12  # pixels; smaller components are noise
MAX_COLOUR_DISTANCE = 90.0  # a median further than this from every known colour has no colour
TRIANGLE_TOP_SHARE = 0.6  # top half / bottom half of the box: triangle ~1/3, circle and square ~1
CORNER_RADIUS = 1.1  # corners: where the box is this far outside its inscribed ellipse
CORNER_FILL = 0.12  # covered share of the corners above which a shape is a square (circle: 0; a
# blurred square: 0.25 and up, measured on renders blurred as in tests/test_shapeworld.py)
HOLLOW_RATIO = 0.85  # a shape covering less of its filled outline than this is drawn as an outline (filled: ~1)
PASTEL_SATURATION = 0.55  # plain shape colours are above 0.65, pastel ones below 0.45


@dataclass(frozen=True)
class FoundShape:
    kind: str
    colour: str | None  # None when no known colour is near
    cell: tuple[int, int]
    filled: np.ndarray  # boolean mask of the shape with its holes filled
    hollow_ratio: float  # coloured pixels / filled pixels
    saturation: float


@dataclass(frozen=True)
class Verdict:
    prompt_adherence: float
    control_iou: float | None  # None without a control image
    style: dict  # style name -> present?
    found: tuple[FoundShape, ...]

    def describe(self, scene: Scene) -> str:
        found = ", ".join(f"{s.colour or '?'} {s.kind} at {s.cell}" for s in self.found) or "nothing"
        parts = [f"prompt adherence {self.prompt_adherence:.2f} ({len(scene.shapes)} asked; found {found})"]
        if self.control_iou is not None:
            parts.append(f"control IoU {self.control_iou:.2f}")
        parts += [f"{name} style {'present' if present else 'absent'}" for name, present in self.style.items()]
        return "; ".join(parts)


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def _saturation(rgb: np.ndarray) -> float:
    high, low = float(rgb.max()), float(rgb.min())
    return 0.0 if high <= 0 else (high - low) / high


_PALETTE = [(name, style_colour(name, style)) for name in COLOURS for style in (None, "pastel")]


def _colour_name(rgb: np.ndarray) -> str | None:
    name, ref = min(_PALETTE, key=lambda entry: float(np.linalg.norm(entry[1] - rgb)))
    return name if np.linalg.norm(ref - rgb) <= MAX_COLOUR_DISTANCE else None


def _kind(filled: np.ndarray) -> str:
    """Triangle when the top half of its bounding box holds much less than the bottom half (apex
    up: 1/3); else square when the box's corners (outside its inscribed ellipse) are covered,
    circle when they are not. Both tests survive the blur that rounds a generated square."""
    rows, cols = np.nonzero(filled)
    box = filled[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    top, bottom = box[: height // 2].sum(), box[height - height // 2 :].sum()
    if top < TRIANGLE_TOP_SHARE * bottom:
        return "triangle"
    y, x = np.mgrid[0:height, 0:width] + 0.5
    corners = ((y - height / 2) / (height / 2)) ** 2 + ((x - width / 2) / (width / 2)) ** 2 > CORNER_RADIUS**2
    return "square" if corners.any() and box[corners].mean() > CORNER_FILL else "circle"


def find_shapes(image: np.ndarray) -> list[FoundShape]:
    """The shapes in an RGB uint8 image, in reading order."""
    pixels = image.astype(np.float64)
    background = background_colour(image)
    distance = np.linalg.norm(pixels - background, axis=2)
    # Hysteresis, as an edge detector does: a region of pixels somewhat off the background is a
    # shape if some of it is clearly off (a thin, anti-aliased outline stays in one piece).
    labels, count = ndimage.label(distance > WEAK_DISTANCE)
    strong = np.unique(labels[distance > FOREGROUND_DISTANCE])
    labels = np.where(np.isin(labels, strong[strong > 0]), labels, 0)
    size = image.shape[0]
    # Background reachable from the image's border (not a hole inside a shape drawn as an outline).
    gaps, _ = ndimage.label(labels == 0)
    outside = np.isin(gaps, np.unique(np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]]))) & (gaps > 0)
    shapes = []
    for index in range(1, count + 1):
        component = labels == index
        if component.sum() < MIN_AREA:
            continue
        # The colour from the quarter of its pixels furthest from the background: a thin outline
        # has few pixels that are not blended with the background.
        solid = component & (distance >= np.percentile(distance[component], 75))
        median = np.median(pixels[solid], axis=0)
        # The shape's edge is where a pixel is half way between background and shape colour (what
        # the edge map draws); a fixed threshold would put it a pixel inside for low-contrast pairs.
        half_way = np.linalg.norm(median - background) / 2
        # (Hysteresis found the shape; this threshold draws its edge, which also drops the noisy
        # weak pixels a fixed low threshold lets in.)
        component = ndimage.binary_dilation(component) & (distance >= half_way) & (outside | component)
        # Closing first: a thin diagonal border can leave one-pixel gaps that would open the hole.
        filled = ndimage.binary_fill_holes(ndimage.binary_closing(component) | component)
        cy, cx = ndimage.center_of_mass(filled)
        cell = (min(2, int(cy * 3 / size)), min(2, int(cx * 3 / size)))
        shapes.append(
            FoundShape(
                kind=_kind(filled),
                colour=_colour_name(median),
                cell=cell,
                filled=filled,
                hollow_ratio=float(component.sum() / filled.sum()),
                saturation=_saturation(median),
            )
        )
    return sorted(shapes, key=lambda s: s.cell)


def prompt_adherence(scene: Scene, found: list[FoundShape]) -> float:
    remaining = list(found)
    matched = 0
    for shape in scene.shapes:
        hit = next((f for f in remaining if (f.kind, f.colour, f.cell) == (shape.kind, shape.colour, shape.cell)), None)
        if hit is not None:
            remaining.remove(hit)
            matched += 1
    return matched / max(len(scene.shapes), len(found), 1)


def control_iou(found: list[FoundShape], control: np.ndarray) -> float:
    """IoU of the found shapes' boundaries with the control's edges (pixels > 127), with a
    tolerance of one pixel: a boundary pixel within one pixel of an edge pixel (and vice versa)
    counts as shared, so a half-pixel shift from anti-aliasing does not count as a miss."""
    edges = (control.max(axis=2) if control.ndim == 3 else control) > 127
    shape_edges = boundaries([f.filled for f in found]) if found else np.zeros_like(edges)
    matched = (
        (shape_edges & ndimage.binary_dilation(edges)).sum() + (edges & ndimage.binary_dilation(shape_edges)).sum()
    ) / 2
    union = shape_edges.sum() + edges.sum() - matched
    return float(matched / union) if union else 1.0


def style_present(found: list[FoundShape], style: str) -> bool:
    if not found:
        return False
    if style == "outline":
        shows = [f.hollow_ratio < HOLLOW_RATIO for f in found]
    elif style == "pastel":
        shows = [f.saturation < PASTEL_SATURATION for f in found]
    else:
        raise ValueError(f"unknown style {style!r}")
    return sum(shows) * 2 > len(shows)


def score(image: np.ndarray, scene: Scene, control: np.ndarray | None = None, styles=("outline", "pastel")) -> Verdict:
    """Judge an RGB uint8 image against the scene its prompt asks for, the control image it was
    conditioned on (if any) and the styles."""
    found = find_shapes(image)
    return Verdict(
        prompt_adherence=prompt_adherence(scene, found),
        control_iou=None if control is None else control_iou(found, control),
        style={name: style_present(found, name) for name in styles},
        found=tuple(found),
    )
