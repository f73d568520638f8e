"""The judge must read freshly rendered ground truth correctly (issue: at least 98%)."""

import random

from sdtune.toy import world
from sdtune.toy.judge import agreement, judge


def _accuracy(styles, attributes, n=150, seed=7):
    rng = random.Random(seed)
    correct = {a: 0 for a in attributes}
    for _ in range(n):
        scene = world.random_scene(rng, styles=styles)
        found = agreement(judge(world.render(scene)), scene)
        for a in attributes:
            correct[a] += found[a]
    return {a: c / n for a, c in correct.items()}


def test_judge_reads_clean_renders():
    acc = _accuracy(world.CLEAN_STYLES, ("colour", "shape", "background", "style"))
    assert min(acc.values()) >= 0.98, acc


def test_judge_reads_degraded_renders():
    acc = _accuracy(world.DEGRADED_STYLES, ("colour", "background", "style"), n=80)
    assert min(acc.values()) >= 0.98, acc


def test_judge_sees_nothing_on_a_plain_background():
    from PIL import Image

    v = judge(Image.new("RGB", (64, 64), world.BACKGROUNDS["gray"]))
    assert v.shape == "none" and v.background == "gray"


def test_every_shape_in_every_colour_on_every_background():
    for shape in world.SHAPES:
        for colour in world.COLOURS:
            for bg in world.BACKGROUNDS:
                scene = world.Scene(shape, colour, bg)
                assert all(agreement(judge(world.render(scene)), scene).values()), scene


def test_continuous_readings_separate_solid_from_outlined_and_blurry():
    """`hollow` and `blur` are the continuous readings behind the outline and blurry verdicts (used to see a
    style's in-between)."""
    for shape in ("circle", "square"):
        for colour in ("red", "blue"):
            solid = judge(world.render(world.Scene(shape, colour, "white")))
            outlined = judge(world.render(world.Scene(shape, colour, "white", style="outline")))
            blurry = judge(world.render(world.Scene(shape, colour, "white", style="blurry")))
            assert solid.hollow < 0.1 and outlined.hollow > 0.9, (shape, colour, solid.hollow, outlined.hollow)
            assert solid.blur < 3.0 < blurry.blur, (shape, colour, solid.blur, blurry.blur)
