"""CLI: `sdtune prompt explain` - how a prompt is parsed, chunked, weighted and scheduled."""

from __future__ import annotations


import click



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
        from sdtune.models.tokenizer import tokenizer_for
        from sdtune.prompts.explain import explain_prompt

        click.echo(explain_prompt(text, negative=negative, tokenizer=tokenizer_for(model), syntax=prompt_syntax,
                                  steps=steps, emphasis=emphasis))
