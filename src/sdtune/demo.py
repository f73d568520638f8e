"""`sdtune demo`: the project's main job end to end on the bundled `tiny` model, on any CPU in minutes.

Stages are small functions so later features (Textual Inversion training, LoRA) add a stage, not a copy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdtune.atomic import atomic_path, write_atomic
from sdtune.toy import world


@dataclass
class DemoResult:
    out: Path
    grid: Path
    report: Path
    figures: dict = field(default_factory=dict)


def base_model_stage(generator, out: Path, *, steps: int, progress: Callable[[int, int], None] | None) -> dict:
    """Every known shape in every colour on every background, one seed each, judged; saves a labelled grid."""
    from sdtune.generate.grid import make_grid
    from sdtune.toy.evaluate import base_prompts, evaluate

    report = evaluate(generator, base_prompts(), seeds=1, steps=steps, progress=progress, keep_images=True)
    images = [r.pop("image") for r in report.records]
    grid = make_grid(images)
    with atomic_path(out / "base_grid.png") as tmp:
        grid.save(tmp, format="PNG")
    return {"base": {"rates": report.rates, "n_images": report.n_images,
                     "seconds_per_image": report.seconds_per_image}, "grid": str(out / "base_grid.png")}


def textual_inversion_stage(generator, out: Path, *, steps: int,
                            progress: Callable[[int, int], None] | None, train_steps: int = 150) -> dict:
    """Train a `<star>` embedding from 5 rendered red stars (the base model has no word for the star) and judge base
    ("shape") vs embedding images on the same prompts and seeds; saves `ti_grid.png` side by side."""
    from sdtune.toy.ti import demo_stage

    return demo_stage(generator, out, train_steps=train_steps, steps=steps, progress=progress)


def run_demo(out: Path, *, model: str | None = None, steps: int = 20,
             progress: Callable[[str, int, int], None] | None = None) -> DemoResult:
    """Run every demo stage and write `report.txt` / `report.json` next to the grids in `out`."""
    from sdtune.generate import Generator

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generator = Generator(model)
    figures = {"model": generator.model.name}
    figures.update(base_model_stage(generator, out, steps=steps,
                                    progress=(lambda i, n: progress("base model", i, n)) if progress else None))
    figures.update(textual_inversion_stage(generator, out, steps=steps, progress=(
        lambda i, n: progress("textual inversion", i, n)) if progress else None))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    rates = figures["base"]["rates"]
    lines = [
        "sdtune demo on the bundled toy model",
        f"model: {figures['model']}, {steps} steps, CFG 7, one seed per prompt",
        f"base prompts: {figures['base']['n_images']} images of 'a {{colour}} {{shape}} on a {{background}} background'",
        "judge agreement: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in rates.items() if k != "style"),
        f"speed: {figures['base']['seconds_per_image']:.2f} s per image; total {figures['seconds']} s",
        f"grid: {figures['grid']}",
        f"world: shapes {', '.join(world.KNOWN_SHAPES)}; colours {', '.join(world.COLOURS)}; "
        f"backgrounds {', '.join(world.BACKGROUNDS)}",
    ]
    if "ti" in figures:
        from sdtune.toy.ti import report_lines

        lines += report_lines(figures["ti"])
    write_atomic(out / "report.txt", "\n".join(lines) + "\n")
    write_atomic(out / "report.json", json.dumps(figures, indent=1))
    return DemoResult(out, Path(figures["grid"]), out / "report.txt", figures)
