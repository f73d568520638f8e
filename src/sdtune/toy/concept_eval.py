"""Judge a learned concept on the toy world at every checkpoint: does the model draw it (fidelity), and does it
still follow the rest of the prompt (context, i.e. editability)?

Overfitting a personalisation shows as the second number falling while the first stays high: the concept word
takes over the prompt and colours/backgrounds asked for are ignored. The validation loss alone cannot see that,
so training on the toy world selects and early-stops on `judge_score` (see `ConceptJudge.score`).

    judge = ConceptJudge(shape="star", term="<star>", seeds=range(4))
    train(cfg, evaluator=judge)           # or evaluator_for(TrainConfig(judge="star", ...)); `sdtune train ti --judge star`

Metrics (fractions of images, fixed seeds, one batch of all seeds per prompt):
  fidelity       context-free prompts ("a photo of a {t}"): the judge reads the target shape;
  context        new colour + background ("a blue {t} on a black background"): both read as asked;
  context_shape  the same images: the target shape is drawn;
  context_both   the same images: the target shape is drawn and colour and background are as asked (editability);
  judge_score    mean of fidelity and context_both (see `score`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from sdtune.errors import SdtuneError

FIDELITY = ("a photo of a {t}", "a picture of a {t}", "a {t}")
# colour/background pairs the concept datasets here never show together (TI: red on white/gray)
CONTEXT = (("blue", "black"), ("green", "gray"), ("yellow", "black"), ("purple", "white"))
METRICS = ("fidelity", "context", "context_shape", "context_both", "judge_score")

# generate(prompts, seeds) -> images, prompt-major (len(prompts) * len(seeds))
GenerateFn = Callable[[list[str], list[int]], list[Any]]


@dataclass
class ConceptJudge:
    """Fidelity and context prompts for one concept term, judged with fixed seeds. Callable as a loop evaluator."""

    shape: str
    term: str
    seeds: Sequence[int] = (0, 1, 2, 3)
    fidelity: Sequence[str] = FIDELITY
    context: Sequence[tuple[str, str]] = CONTEXT
    per_prompt: bool = False          # also report fidelity[<prompt>] per fidelity prompt
    keep: int = 0                     # keep this many images per prompt in the result's "images" (not a metric)
    params: dict[str, Any] = field(default_factory=dict)  # GenerationParams overrides for the evaluator call

    def __post_init__(self) -> None:
        from sdtune.toy import world

        if self.shape not in world.SHAPES:
            raise SdtuneError(f"judge shape {self.shape!r} is not a toy-world shape; use one of "
                              f"{', '.join(world.SHAPES)}")
        self.seeds = list(self.seeds)
        if not self.seeds:
            raise SdtuneError("the judge needs at least one seed")

    def fidelity_prompts(self) -> list[str]:
        return [p.format(t=self.term) for p in self.fidelity]

    def context_prompts(self) -> list[tuple[str, str, str]]:
        """(prompt, colour, background) for each new context."""
        return [(f"a {c} {self.term} on a {b} background", c, b) for c, b in self.context]

    def score(self, generate: GenerateFn) -> dict[str, Any]:
        """The metrics of `generate`'s images. judge_score = (fidelity + context_both) / 2: a checkpoint must draw
        the concept and, asked for it in a new context, draw it there as asked (context alone saturates when the
        concept word simply loses its hold in long prompts, which is overfitting too); the mean (not the min) keeps
        the score moving when either side improves, so early stopping sees progress instead of a plateau of ties."""
        from sdtune.toy.judge import judge

        fid_prompts = self.fidelity_prompts()
        ctx = self.context_prompts()
        images = generate(fid_prompts + [p for p, _, _ in ctx], list(self.seeds))
        n = len(self.seeds)
        if len(images) != n * (len(fid_prompts) + len(ctx)):
            raise SdtuneError(f"the judge expected {n * (len(fid_prompts) + len(ctx))} images, got {len(images)}")
        verdicts = [judge(im) for im in images]
        fid, ctx_v = verdicts[:len(fid_prompts) * n], verdicts[len(fid_prompts) * n:]
        ctx_ok = [v.colour == ctx[i // n][1] and v.background == ctx[i // n][2] for i, v in enumerate(ctx_v)]
        out: dict[str, Any] = {"fidelity": _share(v.shape == self.shape for v in fid),
                               "context": _share(ctx_ok),
                               "context_shape": _share(v.shape == self.shape for v in ctx_v),
                               "context_both": _share(ok and v.shape == self.shape for ok, v in zip(ctx_ok, ctx_v))}
        out["judge_score"] = (out["fidelity"] + out["context_both"]) / 2
        if self.per_prompt:
            for j, p in enumerate(fid_prompts):
                out[f"fidelity[{p}]"] = _share(v.shape == self.shape for v in fid[j * n:(j + 1) * n])
        if self.keep:
            out["images"] = [im for k in range(len(fid_prompts) + len(ctx)) for im in images[k * n:k * n + self.keep]]
        return out

    def __call__(self, ctx: Any) -> dict[str, float]:
        """Loop evaluator: one batch of all seeds per prompt (seeds s0, s0+1, ... as A1111 numbers a batch)."""
        s0, n = self.seeds[0], len(self.seeds)
        if self.seeds != list(range(s0, s0 + n)):
            gen = lambda ps, ss: ctx.generate(ps, ss, **self.params)  # noqa: E731
        else:
            gen = lambda ps, ss: [im for p in ps for im in ctx.generate([p], [s0], batch_size=n,  # noqa: E731
                                                                         **self.params)]
        m = self.score(gen)
        return {k: float(v) for k, v in m.items() if k != "images"}


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(bool(f) for f in flags) / max(1, len(flags))


_PREFIX = re.compile(r"^\s*(?:an?\s+)?(?:(?:photo|picture|rendering|image|drawing)\s+of\s+(?:an?\s+)?)?", re.I)


def default_term(config: Any) -> str | None:
    """The concept words of a run: the TI token, or the instance prompt without its leading 'a photo of a' (with
    lora --pivotal, the new word in place of its abstraction)."""
    opts = config.options
    token = getattr(opts, "token", None)
    if config.method == "ti" and token:
        return str(token)
    prompt = getattr(opts, "prompt", None)
    if prompt:
        term = _PREFIX.sub("", str(prompt)).strip().rstrip(".,")
        if getattr(opts, "pivotal", False):  # lora --pivotal: prompts use the new word in place of the abstraction
            from sdtune.training.methods.pivotal import token_of

            word = token_of(opts)
            term = re.sub(r"(?<!\w)" + re.escape(opts.pivotal_abstraction.strip()) + r"(?!\w)", word, term)
        return term or None
    return None


def judge_from_config(config: Any) -> ConceptJudge | None:
    """The evaluator `TrainConfig.judge` asks for (None when it is off). Raises a one-line SdtuneError."""
    if not config.judge:
        return None
    term = config.judge_term or default_term(config)
    if not term:
        raise SdtuneError(f"judge {config.judge!r} needs the concept words for its prompts: pass --judge-term, "
                          "e.g. '<star>' or 'sks shape' (default: the ti token, or lora/dreambooth's --prompt)")
    return ConceptJudge(shape=config.judge, term=term, seeds=range(config.judge_seeds))


def evaluator_for(config: Any, given: Callable[[Any], Any] | None = None) -> Callable[[Any], Any] | None:
    """What `train(config, evaluator=...)` takes for a config: `given` and, when `config.judge` is set, the toy
    judge after it (its metrics after the given one's). The CLI calls it; the training core never imports toy."""
    concept = judge_from_config(config)
    if concept is None or given is None:
        return concept or given

    def both(ctx: Any) -> dict[str, float]:
        return {**dict(given(ctx) or {}), **concept(ctx)}

    return both
