"""The toy world's side of the recipes (`sdtune recipe ...` on the bundled model): subjects the tiny model can
draw, the degradation words it knows, and the judge's reading of a comparison's images.

Held-out subjects are colour/shape/background combinations the bad images never show, so the comparison measures
a LoRA that generalised "wrong", not one that memorised its subjects."""

from __future__ import annotations

import itertools
import re
from typing import Any

from sdtune.toy import world

_SCENE = re.compile(r"^a (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background$")


def toy_subjects() -> tuple[list[str], list[str]]:
    """(subjects for the bad images, held-out subjects): all 60 base scenes, every fifth held out (12)."""
    scenes = [world.Scene(shape, colour, bg).caption()
              for shape, colour, bg in itertools.product(world.KNOWN_SHAPES, world.COLOURS, world.BACKGROUNDS)]
    held = scenes[2::5]
    return [s for s in scenes if s not in held], held


# the degradations the tiny model was taught by name (world.DEGRADED_STYLES)
TOY_BAD_TERMS = list(world.DEGRADED_STYLES)


def is_scene_prompt(prompt: str) -> bool:
    """Whether the judge can read an image of `prompt` against what it asks ("a red circle on a white background")."""
    m = _SCENE.match(prompt.strip())
    return m is not None and m["colour"] in world.COLOURS and m["shape"] in world.SHAPES \
        and m["background"] in world.BACKGROUNDS


def judge_subject_images(images: list[Any], prompts: list[str]) -> dict[str, float]:
    """Shares of images the judge reads as asked: colour, shape, background each and all three (`agreement`),
    drawn clean (`clean`: style solid), both (`right`); and the mean soft-edge width (`blur`, solid <= ~2.9)."""
    from sdtune.toy.judge import agreement, judge

    if len(images) != len(prompts) or not images:
        raise ValueError("judge_subject_images needs one prompt per image")
    counts = {"colour": 0, "shape": 0, "background": 0, "agreement": 0, "clean": 0, "right": 0}
    blur = 0.0
    for image, prompt in zip(images, prompts):
        m = _SCENE.match(prompt.strip())
        if m is None:
            raise ValueError(f"not a toy-world scene prompt: {prompt!r}")
        scene = world.Scene(m["shape"], m["colour"], m["background"])
        verdict = judge(image)
        ok = agreement(verdict, scene)
        agree = ok["colour"] and ok["shape"] and ok["background"]
        clean = verdict.style == "solid"
        for key, hit in (("colour", ok["colour"]), ("shape", ok["shape"]), ("background", ok["background"]),
                         ("agreement", agree), ("clean", clean), ("right", agree and clean)):
            counts[key] += int(hit)
        blur += verdict.blur
    n = len(images)
    return {**{k: v / n for k, v in counts.items()}, "blur": blur / n}
