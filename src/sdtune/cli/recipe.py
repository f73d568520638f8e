"""CLI: `sdtune recipe ...` - multi-step recipes from the field as one resumable command each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdtune.errors import SdtuneError


@click.group("recipe")
def recipe_group() -> None:
    """Recipes: generate, train and compare in one resumable command (rerun it to continue)."""


@recipe_group.command("wrong-lora", context_settings={"max_content_width": 110})
@click.option("--model", "-m", default="tiny", show_default=True, help="Base model (folder, checkpoint or tiny).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder for the bad images, the "
              "LoRA run, wrong.safetensors and the comparison; rerun with the same --out to resume.")
@click.option("--subjects", type=click.Path(path_type=Path), help="Text file, one subject per line, for the bad "
              "images [default: 20 generic subjects; the toy world's scenes on the tiny model].")
@click.option("--held-out", type=click.Path(path_type=Path), help="Text file of subjects for the comparison, "
              "never used for the bad images [default: 4 generic; 12 unseen toy scenes on tiny].")
@click.option("--bad-terms", multiple=True, metavar="TERMS", help="Degradation words, comma-separated or "
              "repeated [default: blurry, low quality, bad anatomy, ...; blurry, noisy on tiny].")
@click.option("--images", type=int, default=60, show_default=True, help="Bad images to generate (1..5000).")
@click.option("--terms-per-image", type=int, default=2, show_default=True, help="Degradation words per image.")
@click.option("--bad-weight", type=float, default=1.4, show_default=True, help="Weight of each degradation word, "
              "as (blurry:1.4).")
@click.option("--trigger", default="wrong", show_default=True, help="The LoRA's trigger word, put in the negative "
              "prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bad images and the training.")
@click.option("--sampling-steps", type=int, default=20, show_default=True, help="Sampling steps (bad images and "
              "comparison).")
@click.option("--cfg", type=float, default=7.0, show_default=True, help="CFG scale (bad images and comparison).")
@click.option("--sampler", default=None, help="A1111 sampler name [default: as `generate`].")
@click.option("--compare-steps", type=int, help="Sampling steps of the comparison [default: --sampling-steps].")
@click.option("--compare-cfg", type=float, help="CFG scale of the comparison [default: --cfg].")
@click.option("--compare-seeds", type=int, default=4, show_default=True, help="Images per held-out subject.")
@click.option("--lora-weight", type=float, default=0.5, show_default=True,
              help="LoRA weight in the comparison and the usage printed (at 1 the tiny model got worse).")
@click.option("--train-steps", type=int, help="LoRA training steps [default: 600].")
@click.option("--lr", type=float, help="LoRA learning rate [default: 1e-3].")
@click.option("--rank", type=int, help="LoRA rank [default: 8].")
@click.option("--alpha", type=float, help="LoRA alpha [default: the rank].")
@click.option("--batch-size", type=int, help="Training batch size [default: 4].")
@click.option("--text-encoder/--no-text-encoder", default=None, help="Also train text-encoder LoRAs, so the "
              "trigger word itself is learned [default: on].")
def wrong_lora(model: str, out: Path, subjects: Path | None, held_out: Path | None, bad_terms: tuple[str, ...],
               train_steps: int | None, lr: float | None, rank: int | None, alpha: float | None,
               batch_size: int | None, text_encoder: bool | None, **settings: Any) -> None:
    """The negative "wrong" LoRA: the base model makes bad images, a LoRA learns them under the trigger `wrong`,
    and it is used with `wrong` in the negative prompt.

    \b
    Writes OUT/wrong.safetensors (kohya format: loads in A1111, ComfyUI, kohya, diffusers) and OUT/compare/
    (grid.png, report.json: base / `wrong` as negative word / A1111's <lora:wrong:0.5> + negative `wrong` /
    --negative-lora + negative `wrong` / the bad terms as negative, on held-out subjects at fixed seeds).

    \b
    Example: sdtune recipe wrong-lora --out runs/wrong
             sdtune generate "a red circle on a white background" --lora runs/wrong/wrong.safetensors:0.5 \\
                 --negative wrong
    """
    from sdtune.recipes.wrong_lora import WrongLoraSettings, parse_terms, read_lines, run_wrong_lora

    s = WrongLoraSettings(out=str(out), model=model, **settings)
    if subjects is not None:
        s.subjects = read_lines(subjects, "subjects")
    if held_out is not None:
        s.held_out = read_lines(held_out, "held-out subjects")
    if bad_terms:
        s.bad_terms = parse_terms(bad_terms)
    s.train = {k: v for k, v in (("steps", train_steps), ("lr", lr), ("rank", rank), ("alpha", alpha),
                                 ("batch_size", batch_size), ("text_encoder", text_encoder)) if v is not None}
    given = {k for k, v in (("subjects", subjects), ("held_out", held_out), ("bad_terms", bad_terms)) if v}
    evaluate = wrong_lora_model_defaults(s, given)
    result = run_wrong_lora(s, evaluate=evaluate, echo=lambda m: click.echo(m, err=True))
    for name, entry in result.report["variants"].items():
        figures = entry.get("figures")
        if figures:
            click.echo(f"{name:15s} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    click.echo(f"grid: {result.out / 'compare' / 'grid.png'}")


def wrong_lora_model_defaults(s: Any, given: set[str]) -> Any:
    """The bundled tiny model's defaults for the subjects, held-out subjects and bad terms the caller did not give
    (the toy world's scenes and degradations), and the toy judge as the comparison's evaluator when every held-out
    subject is a toy scene (None otherwise). Shared by the CLI and `sdtune ui` (the server never imports the toy
    world; the front door hands it this)."""
    from sdtune.models.bundled import is_bundled_model

    if not is_bundled_model(s.model):
        return None
    from sdtune.toy.recipes import TOY_BAD_TERMS, is_scene_prompt, judge_subject_images, toy_subjects

    subjects, held_out = toy_subjects()
    if "subjects" not in given:
        s.subjects = subjects
    if "held_out" not in given:
        s.held_out = held_out
    if "bad_terms" not in given:
        s.bad_terms = list(TOY_BAD_TERMS)
    return judge_subject_images if all(is_scene_prompt(p) for p in s.held_out) else None  # toy scenes only


def register(cli: click.Group) -> None:
    cli.add_command(recipe_group)
