"""CLI: `sdtune prompt explain` - how a prompt is parsed, chunked, weighted and scheduled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdtune.errors import SdtuneError
from sdtune.models.bundled import bundled_model_path, is_bundled_model


def tokenizer_for(model: str | None) -> Any:
    """The tokenizer `model` uses, without loading the model: single-file checkpoints use SD's CLIP tokenizer
    (shipped with sdtune), diffusers folders (and `tiny`) their own."""
    from sdtune.models.tokenizer import clip_tokenizer

    if model is None:
        return clip_tokenizer()
    if is_bundled_model(model):
        path = bundled_model_path(check=False)
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise SdtuneError(f"model {model!r} not found; pass a diffusers folder, a checkpoint file or `tiny`")
    if path.is_file():
        return clip_tokenizer()
    for sub in ("tokenizer", "tokenizer_2"):
        if (path / sub).is_dir():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(str(path / sub))
    raise SdtuneError(f"{path} has no tokenizer/ folder; pass a diffusers pipeline folder or a checkpoint file")


def register(cli: click.Group) -> None:
    from sdtune.prompts.emphasis import EMPHASES
    from sdtune.prompts.syntax import SYNTAXES

    @cli.group("prompt")
    def prompt() -> None:
        """Inspect prompts: weights, chunks, prompt editing, AND, extra networks."""

    @prompt.command("explain")
    @click.argument("text")
    @click.option("--negative", default="", metavar="TEXT", help="Also explain this negative prompt.")
    @click.option("--model", "-m", metavar="MODEL", help="Use this model's tokenizer (folder, file or `tiny`)  "
                  "[default: SD's CLIP tokenizer]")
    @click.option("--prompt-syntax", type=click.Choice(SYNTAXES), default="auto", show_default=True)
    @click.option("--emphasis", type=click.Choice(EMPHASES), default="auto", show_default=True)
    @click.option("--steps", type=click.IntRange(1, 100000), default=20, show_default=True,
                  help="Sampling steps, for prompt editing.")
    def explain(text: str, negative: str, model: str | None, prompt_syntax: str, emphasis: str, steps: int) -> None:
        """Show how TEXT is read: tokens and their weights per 75-token chunk, the prompt-editing schedule, AND
        parts and extra-network tags.

        Example: sdtune prompt explain "a (red:1.3) cat [sitting:standing:0.5] AND a dog :0.5"
        """
        from sdtune.prompts.explain import explain_prompt

        click.echo(explain_prompt(text, negative=negative, tokenizer=tokenizer_for(model), syntax=prompt_syntax,
                                  steps=steps, emphasis=emphasis))
