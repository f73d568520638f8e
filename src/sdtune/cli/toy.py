"""CLI: `sdtune toy` - the toy world: evaluate a model with the judge, write datasets, judge images."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import click

from sdtune.errors import SdtuneError
from sdtune.paths import check_readable, check_writable_dir


@click.group("toy")
def toy() -> None:
    """The toy world the bundled `tiny` model is trained on, and its judge.

    Held-out parts (what each method must learn): word-less shapes star and diamond (Textual Inversion)
    and the word-less style outline (Hypernetworks, style LoRA), which base training named by words the
    bundled tokenizer then forgot; the absent shape heart (LoRA, DreamBooth) and style striped; degraded
    renderings (blurry, noisy) for the negative-LoRA recipe.
    """


@toy.command("eval")
@click.option("--model", default=None, help="Model to evaluate (default: tiny).")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(1, 64), help="Images per prompt (seeds 0..N-1).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--cfg", "cfg_scale", default=7.0, show_default=True, type=float, help="CFG scale.")
@click.option("--sampler", default=None, help="Sampler name (default: the generator's default).")
@click.option("--shapes", default=None, help="Comma-separated shapes (default: the known shapes).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write report.json here.")
def eval_cmd(model, seeds, steps, cfg_scale, sampler, shapes, out) -> None:
    """Generate every base prompt "a {colour} {shape} on a {background} background" and judge the images.

    Prints the judge's agreement on colour, shape, background and style, and seconds per image.
    """
    from tqdm import tqdm

    from sdtune.generate import Generator
    from sdtune.toy import world
    from sdtune.toy.evaluate import base_prompts, evaluate

    shape_list = tuple(s.strip() for s in shapes.split(",")) if shapes else world.KNOWN_SHAPES
    unknown = [s for s in shape_list if s not in world.SHAPES]
    if unknown:
        raise SdtuneError(f"unknown shape(s) {', '.join(unknown)}; the world has {', '.join(world.SHAPES)}")
    if not math.isfinite(cfg_scale):
        raise SdtuneError(f"--cfg {cfg_scale} is not a number; use a finite CFG scale such as 7")
    if out is not None:
        check_writable_dir(out, "--out")
    gen = Generator(model)
    prompts = base_prompts(shape_list)
    bar = tqdm(total=len(prompts), desc="eval", unit="prompt", file=sys.stderr)
    report = evaluate(gen, prompts, seeds=seeds, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                      progress=lambda i, n: bar.update(1))
    bar.close()
    click.echo(report.summary())
    if out:
        out.mkdir(parents=True, exist_ok=True)
        data = {"model": gen.model.name, "steps": steps, "cfg": cfg_scale, "seeds": seeds, "rates": report.rates,
                "n_images": report.n_images, "seconds_per_image": report.seconds_per_image, "records": report.records}
        from sdtune.atomic import write_atomic

        write_atomic(out / "report.json", json.dumps(data, indent=1))
        click.echo(f"report: {out / 'report.json'}")


@toy.command("dataset")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write PNG + .txt pairs into.")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(1, 100000), help="Number of images.")
@click.option("--shape", "shapes", default="circle", show_default=True, help="Comma-separated shapes.")
@click.option("--colour", "--color", "colours", default=None, help="Comma-separated colours (default: all).")
@click.option("--background", "backgrounds", default=None, help="Comma-separated backgrounds (default: all).")
@click.option("--style", "styles", default="solid", show_default=True, help="Comma-separated styles.")
@click.option("--caption", default=None, help='Caption template, e.g. "a photo of sks {colour} shape"; '
              "fields {shape} {colour} {background} {style}. Default: the world's own caption.")
@click.option("--seed", default=0, show_default=True, type=int)
def dataset_cmd(out, count, shapes, colours, backgrounds, styles, caption, seed) -> None:
    """Render a training set from the toy world (images with .txt captions)."""
    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    def pick(value, universe, what):
        items = tuple(v.strip() for v in value.split(",")) if value else tuple(universe)
        bad = [v for v in items if v not in universe]
        if bad:
            raise SdtuneError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(universe)}")
        return items

    sh = pick(shapes, world.SHAPES, "shape")
    co = pick(colours, world.COLOURS, "colour")
    bg = pick(backgrounds, world.BACKGROUNDS, "background")
    st = pick(styles, world.STYLES, "style")
    if caption:  # a bad template fails here, before anything is written
        from sdtune.prompts.tokens import check_text

        check_text(caption, "--caption")
        fields = {"shape": sh[0], "colour": co[0], "background": bg[0], "style": st[0]}
        try:
            caption.format(**fields)
        except KeyError as exc:
            raise SdtuneError(f"--caption {caption!r}: unknown field {{{exc.args[0]}}}; use {{shape}} {{colour}} "
                              "{background} {style} (write {{ }} for literal braces)") from None
        except (ValueError, IndexError, AttributeError) as exc:
            raise SdtuneError(f"--caption {caption!r} is not a valid template ({exc}); use fields {{shape}} "
                              "{colour} {background} {style} and write {{ }} for literal braces") from None
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} is a file, not a folder; choose a new folder for the dataset")
    if out.exists() and any(out.iterdir()):
        raise SdtuneError(f"{out} is not empty; choose a new folder so nothing is overwritten")
    check_writable_dir(out, "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SdtuneError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); choose another") from None
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, shapes=sh, colours=co, backgrounds=bg, styles=st) for _ in range(count)]
    caps = [caption.format(shape=s.shape, colour=s.colour, background=s.background, style=s.style) if caption
            else s.caption(shape_word=s.shape) for s in scenes]
    write_dataset(out, scenes, caps)
    click.echo(f"wrote {count} images with captions to {out}")


@toy.command("judge")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def judge_cmd(images) -> None:
    """Read toy-world images back: colour, shape, background, style, with confidences."""
    from PIL import Image, UnidentifiedImageError

    from sdtune.toy.judge import judge

    for path in images:
        if path.is_file():
            check_readable(path, str(path))
        try:
            with Image.open(path) as im:
                v = judge(im)
        except (FileNotFoundError, IsADirectoryError):
            raise SdtuneError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise SdtuneError(f"{path}: not a readable image ({exc})") from None
        click.echo(f"{path}: {v.colour} {v.shape} on {v.background}, {v.style} "
                   f"(conf colour {v.colour_conf:.2f} shape {v.shape_conf:.2f} style {v.style_conf:.2f})")


@toy.command("build-tiny", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def build_tiny_cmd(args) -> None:
    """Train the bundled tiny model (stages vae, unet, export; `build-tiny --help` for the options)."""
    from sdtune.toy.build_tiny import main

    main(list(args))


def register(cli: click.Group) -> None:
    cli.add_command(toy)
