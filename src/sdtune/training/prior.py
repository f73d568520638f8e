"""What LoRA and DreamBooth share: the instance prompt (`--prompt`) with per-image captions, and prior
preservation (`--class-prompt`, `--class-data`, generated and cached class images, `--prior-weight`).

Instance prompt rule (`--prompt "a photo of sks shape"`), per training image:
  * no caption file, or an empty one (also a kohya folder name used as caption) -> the prompt;
  * a caption that starts with "+"  -> extends it: "+ on a black background" -> "a photo of sks shape, on a black
    background";
  * any other caption               -> replaces it (the caption is the whole text).

Prior preservation: every step also trains on class images ("a photo of a shape") with the class prompt, with the
loss weighted by `--prior-weight`, so the model keeps what the class looked like before (the DreamBooth paper's
prior-preservation loss). Class images come from `--class-data DIR` or are generated once by the base model
(seeds 0..N-1, the run's sample settings) and cached in OUT/class_images/<key>/, key = sha256 of (model hash, class
prompt, count, resolution, sampler settings), so a rerun or `--resume` reuses them. They are encoded to latents
once, like the instance images; the class prompt's text encoding is cached while the text encoder is frozen.

Supplied class images (`--class-data`) may carry a `.txt` caption each (kohya's regularization images): that
caption is used for the image, the class prompt for images without one. Captioned class images of many kinds
(e.g. generated from the base model's own varied prompts) protect more of what the model knew than one prompt.
Every image must be RGB (another mode -> an error naming the files: convert
them) and at least the training resolution on its shorter side (smaller -> an error: upscaled class images would
teach the model blur). Larger or non-square images are centre-cropped and resized to the training size with one
warning, as training images are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune.errors import SdtuneError
from sdtune.training.identifier import auto_class_prompts
from sdtune.training.keep_base import KeepBase, check_keep_base, keep_base_for
from sdtune.training.options import opt

if TYPE_CHECKING:
    from sdtune.training.context import TrainingContext
    from sdtune.training.methods.base import Batch, DiffusionLoss, TrainingMethod

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class PersonalizeOptions:
    """Options shared by `lora` and `dreambooth` (declared once; each method's Options inherits them)."""

    prompt: str | None = opt(None, "Instance prompt, e.g. 'a photo of sks shape': used for images without a caption "
                             "file; a caption starting with '+' extends it, any other caption replaces it.",
                             section="personalize", kind="str", metavar="TEXT")
    prior_preservation: bool | None = opt(None, "Prior-preservation loss on class images, which keeps what prompts "
                                          "without the identifier gave before (default: on for dreambooth; for lora "
                                          "on when --class-prompt, --class-data or --identifier is given). Without "
                                          "--class-prompt the class prompts are the captions minus the identifier "
                                          "(see --identifier; off with a warning when there is none). Trade-off, "
                                          "measured on the toy world (docs/lora.md): the base model is kept (99% "
                                          "of its judge agreement) but the concept is learnt more slowly and "
                                          "narrowly (the bare identifier prompt 6-38% instead of 81%); class "
                                          "images cost a generation once (cached) and each step trains on as many "
                                          "class images as instance images (about twice the time per step).",
                                          section="personalize", kind="bool")
    identifier: str | None = opt(None, "The word that names the new concept in the captions (e.g. sks); default: "
                                 "detected, a word in every caption that is a usual identifier (sks, ohwx, zwx, "
                                 "<token>) or the one the tokenizer does not know. Automatic prior preservation "
                                 "uses the captions without it as class prompts.", section="personalize",
                                 kind="str", metavar="WORD")
    class_prompt: str | None = opt(None, "Prompt of the class, e.g. 'a photo of a shape' (prior preservation; "
                                   "default: the captions without the identifier).",
                                   section="personalize", kind="str", metavar="TEXT")
    class_data: str | None = opt(None, "Folder of class images (RGB, at least the training size); default: "
                                 "generated by the base model once and cached in OUT/class_images.",
                                 section="personalize", kind="path", metavar="DIR")
    num_class_images: int = opt(50, "Class images to generate (when --class-data is not given).",
                                section="personalize", kind="int")
    prior_weight: float = opt(1.0, "Weight of the prior-preservation loss.", section="personalize", kind="float")
    keep_base: float = opt(0.0, "Weight of the keep-base term (0: off; 1 is typical): each training image is also "
                           "denoised with its caption minus the identifier (and the empty prompt), trained toward "
                           "the base model's own prediction, so prompts without the identifier keep the base "
                           "model; no class images (about 2x the step time; DreamBooth keeps a copy of the "
                           "weights). On the toy world it keeps 95-100% of the base but alone slows learning a "
                           "word; with --pivotal it keeps both (docs/lora.md).", section="personalize",
                           kind="float", metavar="W")


def prior_mode(options: Any, default: bool) -> str:
    """off; class (--class-prompt / --class-data: the user's class images); auto (class prompts from the captions
    minus the identifier). `default`: the method's default when prior_preservation is unset (both methods: on)."""
    asked = options.class_prompt or options.class_data or options.identifier
    if options.prior_preservation is False or (options.prior_preservation is None and not default and not asked):
        return "off"
    if options.class_prompt or options.class_data:
        return "class"
    return "auto"


def prior_enabled(options: Any, default: bool) -> bool:
    """Whether a prior term may be used (auto mode still turns it off when the captions have no identifier)."""
    return prior_mode(options, default) != "off"


def check_personalize_options(options: Any, method: str, prior_default: bool, resolution: int | None = None) -> None:
    """Option checks before anything loads; supplied class images are checked here too (their size only when the
    resolution is given, else again once the model's native size is known)."""
    if options.prompt is not None and not options.prompt.strip():
        raise SdtuneError("--prompt is empty; pass the instance prompt, e.g. 'a photo of sks shape'")
    mode = prior_mode(options, prior_default)
    check_keep_base(options.keep_base)
    if options.identifier is not None and (not options.identifier.strip() or len(options.identifier.split()) > 1):
        raise SdtuneError(f"--identifier {options.identifier!r} must be one word, the one in your captions that "
                          "names the concept (e.g. sks)")
    if mode != "off":
        if mode == "class" and not (options.class_prompt or "").strip():
            raise SdtuneError(f"{method}: --class-data needs --class-prompt (e.g. 'a photo of a shape'), the caption "
                              "of class images without a .txt caption; or leave both out for class prompts made "
                              "from your captions, or turn it off with --no-prior-preservation")
        if options.num_class_images < 1:
            raise SdtuneError(f"num_class_images {options.num_class_images} must be at least 1 (50-200 is typical)")
        if not (options.prior_weight > 0) or options.prior_weight != options.prior_weight:
            raise SdtuneError(f"prior_weight {options.prior_weight} must be > 0 (1 is typical)")
        if options.class_data is not None and not Path(options.class_data).expanduser().is_dir():
            raise SdtuneError(f"class_data folder {options.class_data} does not exist; pass a folder of class "
                              "images, or leave it out to generate them")
        if options.class_data is not None:
            load_class_folder(options.class_data, resolution or 1, load=False)
    # prior preservation explicitly off: class settings may stay in the config, unused


def instance_caption(caption: str, prompt: str | None, from_file: bool) -> str:
    """The training caption of one image under the instance-prompt rule (module docstring)."""
    if prompt is None:
        return caption
    text = caption.strip() if from_file else ""
    if not text:
        return prompt
    if text.startswith("+"):
        rest = text[1:].strip().lstrip(",").strip()
        return f"{prompt}, {rest}" if rest else prompt
    return text


def apply_instance_prompt(ctx: TrainingContext, prompt: str | None) -> None:
    """`--prompt`: the caption of every image without a caption file (or extending it with `+ ...`)."""
    if prompt is None:
        return
    ctx.map_captions(lambda it: instance_caption(it.caption, prompt, it.caption_source == "file"))


# ------------------------------------------------------------------------------------------- class images

def class_caption(image_path: Path) -> str | None:
    """The non-empty `.txt` sidecar caption of a class image, else None (the class prompt applies)."""
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def load_class_folder(folder: str | Path, resolution: int, *,
                      load: bool = True) -> tuple[list[Any], list[str], list[str | None]]:
    """(RGB PIL images at resolution x resolution, warnings, per-image sidecar captions or None) from a folder;
    SdtuneError on bad images. load=False: only check (modes and sizes from the file headers)."""
    from PIL import Image

    from sdtune.training.images import fit_image

    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith("."))
    if not files:
        raise SdtuneError(f"class_data folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    bad_mode, small, unreadable, images, captions, resized = [], [], [], [], [], 0
    for f in files:
        try:
            with Image.open(f) as im:
                if load:
                    im.load()
                if im.mode != "RGB":
                    bad_mode.append(f"{f.name} ({im.mode})")
                    continue
                if min(im.size) < resolution:
                    small.append(f"{f.name} ({im.size[0]}x{im.size[1]})")
                    continue
                if im.size != (resolution, resolution):
                    resized += 1
                if load:
                    images.append(fit_image(im.copy(), (resolution, resolution)))
                    captions.append(class_caption(f))
        except (OSError, ValueError) as exc:
            unreadable.append(f"{f.name} ({exc})")

    def listed(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f" ... ({len(xs) - 5} more)" if len(xs) > 5 else "")

    if unreadable:
        raise SdtuneError(f"class_data: {len(unreadable)} image(s) cannot be read: {listed(unreadable)}")
    if bad_mode:
        raise SdtuneError(f"class_data: {len(bad_mode)} image(s) are not RGB: {listed(bad_mode)}; convert them to "
                          "RGB (e.g. PIL Image.convert('RGB'), flattening transparency onto the background you mean)")
    if small:
        raise SdtuneError(f"class_data: {len(small)} image(s) are smaller than the training resolution "
                          f"{resolution}: {listed(small)}; use class images of at least {resolution}x{resolution} "
                          "(or leave --class-data out to generate them at the right size)")
    warnings = []
    if resized and load:
        warnings.append(f"class_data: {resized} of {len(images)} image(s) are not {resolution}x{resolution}; they "
                        "are centre-cropped and resized to it")
    return images, warnings, captions


def class_cache_key(ctx: TrainingContext, class_prompt: str | list[str], count: int) -> tuple[str, dict[str, Any]]:
    cfg = ctx.config
    model = ctx.model
    data = {"model_hash": str(model.hash), "model": str(model.name), "family": model.family,
            "class_prompt": class_prompt, "count": count, "resolution": ctx.resolution,
            "steps": cfg.sample_steps, "cfg": cfg.sample_cfg, "sampler": cfg.sample_sampler,
            "negative": cfg.sample_negative, "clip_skip": cfg.clip_skip}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16], data


def generated_class_images(ctx: TrainingContext, class_prompt: str | list[str], count: int) -> list[Any]:
    """Class images from the base model, generated once and cached in OUT/class_images/<key>/. A list of prompts:
    image i is made from prompt i mod len (seed i) and gets it as its .txt caption."""
    from PIL import Image

    from sdtune.atomic import atomic_path, write_atomic

    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt)
    key, data = class_cache_key(ctx, class_prompt, count)
    folder = ctx.out / "class_images" / key
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    what = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts (your captions without the identifier)"
    if all(p.is_file() for p in paths):
        ctx.echo(f"prior preservation: reusing {count} cached class image(s) in {folder}")
        return [Image.open(p).convert("RGB") for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    ctx.echo(f"prior preservation: generating {len(todo)} class image(s) of {what} with the base model into "
             f"{folder} (once; reused on rerun)")
    for i in todo:
        prompt = prompts[i % len(prompts)]
        img = ctx.generate_images([prompt], [i])[0]
        if len(prompts) > 1:
            write_atomic(paths[i].with_suffix(".txt"), prompt + "\n")
        with atomic_path(paths[i]) as tmp:
            img.save(tmp, format="PNG")
    return [Image.open(p).convert("RGB") for p in paths]


class PriorPreservation:
    """Class latents + class prompt; `loss(batch, diffusion_loss)` is the weighted prior term of one step."""

    def __init__(self, method: TrainingMethod, ctx: TrainingContext, options: Any,
                 prompts: list[str] | None = None, identifier: str | None = None) -> None:
        """prompts: automatic mode's class prompts (the captions without `identifier`) instead of --class-prompt."""
        self.method = method
        self.identifier = identifier
        self.prompt = (options.class_prompt or "").strip() or \
            (f"auto: captions without {identifier!r}" if identifier else "")
        self.weight = float(options.prior_weight)
        self.seed = ctx.config.seed
        self.sample = ctx.latents_mode == "sample"
        self.resolution = ctx.resolution
        self.is_sdxl = ctx.is_sdxl
        self.device = ctx.device
        captions: list[str | None]
        if options.class_data:
            images, warnings, captions = load_class_folder(options.class_data, ctx.resolution)
            for w in warnings:
                ctx.echo(f"warning: {w}")
            source = str(options.class_data)
        elif prompts:
            images = generated_class_images(ctx, prompts, options.num_class_images)
            captions = [prompts[i % len(prompts)] for i in range(len(images))]
            source = "generated"
        else:
            images = generated_class_images(ctx, self.prompt, options.num_class_images)
            captions = [None] * len(images)
            source = "generated"
        self.captions = [c or self.prompt for c in captions]
        self.latents = ctx.encode_images(images)
        own = sum(c is not None for c in captions)
        how = "each with its own caption" if own == len(captions) else \
            f"{own} with their own caption, the others with {self.prompt!r}" if own else f"with {self.prompt!r}"
        ctx.echo(f"prior preservation: {len(self.latents)} class image(s) ({source}), {how}, "
                     f"weight {self.weight:g}")

    def loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor:
        from sdtune.training.methods.base import Batch

        n = len(batch.latents)
        rng = random.Random(f"{self.seed}:prior:{batch.step}:{batch.indices}")
        picks = [rng.randrange(len(self.latents)) for _ in range(n)]
        gen = torch.Generator("cpu").manual_seed(rng.randrange(2**63)) if self.sample else None
        lat = torch.stack([self.latents[i].get(False, generator=gen) for i in picks]).to(batch.latents.device)
        ids = None
        if self.is_sdxl:
            r = float(self.resolution)
            ids = torch.tensor([[r, r, 0.0, 0.0, r, r]] * n, device=batch.latents.device)
        cond = self.method.conditioning(Batch(latents=lat, captions=[self.captions[i] for i in picks], time_ids=ids,
                                              step=batch.step))
        return self.weight * diffusion_loss(lat.to(batch.latents.dtype), cond)


class PersonalizeMixin:
    """prepare_data / extra_loss / metadata for methods with `PersonalizeOptions` (call `personalize_prepare` from
    prepare_data, and add `personalize_metadata()` to the method's metadata)."""

    prior_default: bool = False
    prior: PriorPreservation | None = None
    keep_base: KeepBase | None = None
    options: Any  # a PersonalizeOptions subclass, set by the method's TrainingMethod.__init__

    def personalize_prepare(self, ctx: TrainingContext) -> None:
        from sdtune.training.methods.base import TrainingMethod

        assert isinstance(self, TrainingMethod)  # the mixin is only ever a TrainingMethod subclass's base
        options = self.options
        apply_instance_prompt(ctx, options.prompt)
        mode = prior_mode(options, self.prior_default)
        self.prior = None
        if mode == "class":
            self.prior = PriorPreservation(self, ctx, options)
        elif mode == "auto":
            tokenizer = getattr(ctx.model.pipe, "tokenizer", None)
            ident, prompts = auto_class_prompts(ctx, options, tokenizer)
            if prompts:
                how = "given" if options.identifier else "found in every caption"
                ctx.echo(f"prior preservation: identifier {ident!r} ({how}); class prompts: the {len(prompts)} "
                         f"caption(s) without it, e.g. {prompts[0]!r}")
                self.prior = PriorPreservation(self, ctx, options, prompts=prompts, identifier=ident)
            elif options.prior_preservation:
                raise SdtuneError(f"{self.name}: prior preservation needs --class-prompt (e.g. 'a photo of a dog') "
                                  "or an identifier in the captions (--identifier sks); none was found")
            else:
                ctx.echo("warning: prior preservation is off: no identifier in the captions (a word in every caption "
                         "such as sks or ohwx) and no --class-prompt, so prompts without the concept may change "
                         "too; pass --identifier WORD or --class-prompt TEXT to keep the base model, or "
                         "--no-prior-preservation to silence this")
        self.keep_base = keep_base_for(self, ctx, options, mode, self.prior.identifier if self.prior else None)

    def base_weights(self) -> contextlib.AbstractContextManager[None]:
        """Inside: the method's live modules compute what the base model computed (for `--keep-base`)."""
        raise SdtuneError(f"{getattr(self, 'name', 'this method')} does not support --keep-base")

    def extra_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        terms = [term.loss(batch, diffusion_loss) for term in (self.prior, self.keep_base) if term is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def personalize_metadata(self) -> dict[str, str]:
        """The instance and class prompts and the prior weight, for the output file's metadata."""
        options = self.options
        meta: dict[str, str] = {}
        if options.prompt:
            meta["sdtune_instance_prompt"] = options.prompt
        if self.prior is not None:
            meta.update({"sdtune_class_prompt": self.prior.prompt, "sdtune_prior_weight": f"{self.prior.weight:g}"})
            if self.prior.identifier:
                meta["sdtune_identifier"] = self.prior.identifier
        if self.keep_base is not None:
            meta.update({"sdtune_keep_base": f"{self.keep_base.weight:g}",
                         "sdtune_identifier": self.keep_base.identifier})
        return meta
