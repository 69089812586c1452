"""The shape world: captions say what the renderer draws, and the scorer reads it back.

The scorer is checked against rendered ground truth (every shape found, with its kind, colour and
cell), against images that differ from the prompt in one named way, and on softened and noisy
renders, since generated images are never crisp.
"""

import random

import numpy as np
import pytest
from scipy import ndimage

from swiftd.shapeworld.render import STYLES, edge_map, render
from swiftd.shapeworld.scene import BACKGROUNDS, Scene, Shape, parse_caption
from swiftd.shapeworld.score import find_shapes, score

SCENES = [Scene.sample(random.Random(seed)) for seed in range(200)]


def _same_request(a: Scene, b: Scene) -> bool:
    return a.background == b.background and [(s.kind, s.colour, s.cell) for s in a.shapes] == [
        (s.kind, s.colour, s.cell) for s in b.shapes
    ]


def test_a_caption_parses_back_to_its_scene_and_sampling_is_seeded():
    assert all(_same_request(parse_caption(scene.caption()), scene) for scene in SCENES)
    assert Scene.sample(random.Random(7)) == Scene.sample(random.Random(7))
    assert render(SCENES[0]).tobytes() == render(SCENES[0]).tobytes()
    caption = SCENES[0].caption()
    assert caption.startswith("a ") and caption.endswith(" background")
    assert _same_request(parse_caption("in outline style, " + caption), SCENES[0])  # a trigger word is ignored
    with pytest.raises(ValueError, match="not a shape-world caption"):
        parse_caption("a photo of an astronaut riding a horse")
    with pytest.raises(ValueError, match="unknown shape"):
        parse_caption("a red hexagon at the top on a white background")


@pytest.mark.parametrize("style", [None, *STYLES])
def test_the_scorer_reads_back_every_rendered_scene(style):
    verdicts = [score(render(scene, style=style), scene, edge_map(scene)) for scene in SCENES]
    misses = [scene.caption() for scene, v in zip(SCENES, verdicts) if v.prompt_adherence < 1.0]
    assert not misses, f"{len(misses)} of {len(SCENES)} rendered scenes not read back, e.g. {misses[:3]}"
    assert min(v.control_iou for v in verdicts) >= 0.8
    for name in STYLES:
        shown = sum(v.style[name] for v in verdicts)
        assert shown == (len(SCENES) if name == style else 0), name


def test_the_scorer_survives_blur_and_noise_as_generated_images_have():
    rng = np.random.default_rng(0)
    for scene in SCENES[:50]:
        image = render(scene).astype(np.float64)
        soft = ndimage.gaussian_filter(image, sigma=(0.8, 0.8, 0))
        noisy = np.clip(soft + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        verdict = score(noisy, scene, edge_map(scene))
        assert verdict.prompt_adherence == 1.0, scene.caption()
        assert verdict.control_iou >= 0.6


def test_each_difference_from_the_prompt_costs_its_share():
    red = Shape("circle", "red", (0, 0), size=0.75)
    blue = Shape("square", "blue", (2, 2), size=0.75)
    asked = Scene((red, blue), "white")
    image = render(asked)
    assert score(image, asked).prompt_adherence == 1.0
    wrong_colour = Scene((Shape("circle", "green", (0, 0)), blue), "white")
    wrong_kind = Scene((Shape("triangle", "red", (0, 0)), blue), "white")
    wrong_cell = Scene((Shape("circle", "red", (0, 1)), blue), "white")
    for scene in (wrong_colour, wrong_kind, wrong_cell):
        assert score(image, scene).prompt_adherence == 0.5, scene.caption()
    assert score(image, Scene((red,), "white")).prompt_adherence == 0.5  # an extra shape in the image
    blank = np.full((64, 64, 3), BACKGROUNDS["white"], dtype=np.uint8)
    assert score(blank, asked).prompt_adherence == 0.0 and find_shapes(blank) == []


def test_noise_and_the_wrong_control_score_near_zero():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.mean([score(noise, scene).prompt_adherence for scene in SCENES[:50]]) < 0.05
    ious = [score(render(a), a, edge_map(b)).control_iou for a, b in zip(SCENES[:50], SCENES[50:100])]
    assert np.mean(ious) < 0.3
