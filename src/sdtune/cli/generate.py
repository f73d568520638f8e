"""CLI: `sdtune generate` - txt2img with A1111 settings, PNGs with A1111 metadata, and `--from-png` to repeat one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from sdtune.errors import SdtuneError
from sdtune.models.bundled import is_bundled_model
from sdtune.paths import check_readable

DTYPES = ("auto", "fp32", "fp16", "bf16")


def _resolvable(name: str | None) -> bool:
    """Whether a model name read from a PNG can be loaded as is (A1111 records names, not paths)."""
    if not name:
        return False
    return is_bundled_model(name) or Path(name).expanduser().exists()


def _from_png(png: Path, overrides: dict[str, Any], model: str | None, vae: str | None, refiner: str | None,
              notes: list[str]) -> tuple[Any, set[int] | None, str | None, str | None, Any]:
    """Settings from a PNG's infotext with command-line overrides.

    Returns (params, batch positions to keep or None for all, model, vae, recorded). An image made in a batch is
    repeated by re-running its whole batch (bit-exact) and keeping only its slot, unless the seed or batch
    layout is overridden. Messages for the user are appended to `notes` (printed once loading succeeded)."""
    from sdtune.generate.params import params_from_infotext
    from sdtune.generate.pnginfo import parse_infotext, read_png_infotext

    if png.is_dir():
        raise SdtuneError(f"--from-png {png} is a folder; give the path of one PNG made by sdtune or A1111")
    check_readable(png, f"--from-png {png}")
    rec = params_from_infotext(parse_infotext(read_png_infotext(png)))
    params = rec.params.replace(**overrides)
    keep: set[int] | None = None
    if {"seed", "batch_size", "batch_count"} & overrides.keys():
        params = params.replace(batch_size=overrides.get("batch_size", 1))
    elif params.batch_size > 1:
        if not 0 <= rec.batch_pos < params.batch_size or params.seed - rec.batch_pos < 0:
            raise SdtuneError(f"{png}: 'Batch pos' {rec.batch_pos} does not fit its batch of {params.batch_size} "
                              f"and seed {params.seed}; pass --batch-size 1 to repeat the seed alone")
        params = params.replace(seed=params.seed - rec.batch_pos)
        keep = {rec.batch_pos}
    if model is None:
        name = rec.model.name if rec.model else None
        if not _resolvable(name):
            raise SdtuneError(f"{png} was made with model {name or '(unknown)'!r}, which is not a local path; "
                              "pass --model PATH to that model")
        model = name
    if vae is None and rec.vae is not None:
        if _resolvable(rec.vae.name):
            vae = rec.vae.name
        else:
            notes.append(f"warning: {png.name} was made with VAE {rec.vae.name!r}; pass --vae PATH to use it "
                         "too (the model's own VAE is used now)")
    if refiner is not None:
        params = params.replace(refiner=refiner)
    elif params.refiner and not _resolvable(params.refiner):
        raise SdtuneError(f"{png} was made with refiner {params.refiner!r}, which is not a local path; "
                          "pass --refiner PATH to that model")
    return params, keep, model, vae, rec


def _networks_not_given(png: Path, rec: Any, prompt: str, loras_given: bool, hypernetworks_given: bool) -> list[str]:
    """Warnings for networks the image's infotext names that this run will not apply: a LoRA in `Lora hashes` but
    not in the prompt's tags was given as `--lora FILE:W` (its file and weight are not in the infotext), and a
    hypernetwork as `--hypernetwork`; without them the image silently differs."""
    from sdtune.adapters.lora.tags import LORA_TAGS, lora_hashes_names
    from sdtune.adapters.tags import prompt_tags

    notes = []
    tagged = {str(t.name).replace("\\", "/").rsplit("/", 1)[-1] for t in prompt_tags(LORA_TAGS, prompt)}
    outside = [name for name in lora_hashes_names(rec.extra.get("Lora hashes", "")) if name not in tagged]
    if outside and not loras_given:
        notes.append(f"warning: {png.name} was made with LoRA {', '.join(outside)} applied outside its prompt "
                     "(--lora FILE:W); pass the same --lora to repeat it: without it the image differs")
    if rec.extra.get("Hypernet") and not hypernetworks_given:
        notes.append(f"warning: {png.name} was made with hypernetwork {rec.extra['Hypernet']} at strength "
                     f"{rec.extra.get('Hypernet strength', '1')}; pass --hypernetwork FILE:STRENGTH to repeat it: "
                     "without it the image differs")
    return notes


def _progress_bar(total_hint: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total_hint, unit="step", file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


def run_generate(prompt: str | None, *, from_png: Path | None, model: str | None, vae: str | None,
                 refiner: str | None, out: Path, device: str | None, dtype: str | None, grid: bool,
                 overrides: dict[str, Any], loras: Any = None, lora_dirs: Any = None,
                 negative_loras: Any = None) -> list[Path]:
    """The command's work, callable without click: validate, load, generate, save, print.

    loras: `FILE[:WEIGHT]` strings (or (file, weight) pairs) applied to the model; negative_loras: the same,
    applied to the unconditional (negative) pass only."""
    from sdtune.generate import GenerationParams, Generator
    from sdtune.generate.grid import make_grid
    from sdtune.generate.output import check_out_dir, save_grid, save_image

    from sdtune.adapters.hypernetwork.tags import parse_hypernetwork_arg

    hn_specs = [parse_hypernetwork_arg(x) if isinstance(x, str) else tuple(x)
                for x in overrides.pop("hypernetworks", None) or ()]
    hn_dirs = list(overrides.pop("hypernetwork_dirs", None) or ())
    for hn_path, _ in hn_specs:  # before loading the model: a typo costs nothing
        if not Path(hn_path).expanduser().is_file():
            raise SdtuneError(f"--hypernetwork {hn_path}: no such file")
        check_readable(hn_path, f"--hypernetwork {hn_path}")
    for hn_dir in hn_dirs:
        if not Path(hn_dir).expanduser().is_dir():
            raise SdtuneError(f"--hypernetwork-dir {hn_dir}: no such folder")
        check_readable(hn_dir, f"--hypernetwork-dir {hn_dir}")
    emb_sources = list(overrides.pop("embeddings", None) or ())
    for src in emb_sources:  # before loading the model: a typo costs nothing
        if not Path(src).expanduser().exists():
            raise SdtuneError(f"--embeddings {src}: no such file or folder")
        check_readable(src, f"--embeddings {src}")
    if prompt is not None:
        overrides["prompt"] = prompt
    keep: set[int] | None = None
    recorded = None
    notes: list[str] = []
    if from_png is not None:
        params, keep, model, vae, recorded = _from_png(from_png, overrides, model, vae, refiner, notes)
        notes += _networks_not_given(from_png, recorded, params.prompt, bool(loras), bool(hn_specs or hn_dirs))
    else:
        if prompt is None:
            raise SdtuneError('no prompt given; run `sdtune generate "a photo of a cat"`, or --from-png IMAGE.png')
        params = GenerationParams(**overrides, refiner=refiner)
    params = params.validate()  # before loading anything: a typo costs nothing and writes nothing
    check_out_dir(out)

    from sdtune.adapters.lora.tags import parse_lora_arg

    lora_specs = [parse_lora_arg(x) if isinstance(x, str) else tuple(x) for x in (loras or ())]
    negative_specs = [parse_lora_arg(x, "--negative-lora") if isinstance(x, str) else tuple(x)
                      for x in (negative_loras or ())]
    for option, specs in (("--lora", lora_specs), ("--negative-lora", negative_specs)):
        for lora_path, _ in specs:  # before loading the model: a typo costs nothing
            if not Path(lora_path).expanduser().is_file():
                what = "is a folder; give a LoRA file" if Path(lora_path).expanduser().is_dir() else "no such file"
                raise SdtuneError(f"{option} {lora_path}: {what}")
            check_readable(lora_path, f"{option} {lora_path}")
    if negative_specs and params.cfg_scale <= 1.0:
        raise SdtuneError(f"--negative-lora acts on the unconditional pass, which CFG scale {params.cfg_scale:g} "
                          "does not run; use --cfg above 1")
    lora_dirs = list(lora_dirs or ())  # <lora:name:weight> tags are looked up here, then in the --lora folders
    for lora_dir in lora_dirs:
        if not Path(lora_dir).expanduser().is_dir():
            raise SdtuneError(f"--lora-dir {lora_dir}: no such folder")
        check_readable(lora_dir, f"--lora-dir {lora_dir}")
    from sdtune.models.device import resolve_device_dtype
    from sdtune.models.loading import resolve_spec

    resolve_device_dtype(device, None if dtype == "auto" else dtype)  # an unknown device or dtype costs no loading
    for option, name in (("--model", model), ("--vae", vae), ("--refiner", params.refiner)):
        if name is None and option != "--model":
            continue  # none given
        if option == "--vae" and not Path(str(name)).expanduser().exists():
            raise SdtuneError(f"VAE {name!r} not found; pass a diffusers VAE folder or a .safetensors/.ckpt VAE file")
        path, _ = resolve_spec(name)  # a missing model fails here, with the loader's own message
        check_readable(path, f"{option} {name}")
    generator = Generator(model, vae=vae, device=device, dtype=None if dtype == "auto" else dtype,
                          loras=lora_specs or None, lora_dirs=lora_dirs, negative_loras=negative_specs or None)
    if hn_specs or hn_dirs:
        generator.set_hypernetworks(hn_specs, dirs=hn_dirs)
    if emb_sources:  # Textual Inversion embeddings, usable by name in the prompts
        lib = generator.embeddings
        lib.echo = lambda m: click.echo(f"warning: {m}", err=True)
        for src in emb_sources:
            lib.add_source(src, refresh=False)
        lib.refresh()
        click.echo(f"embeddings: {', '.join(lib.names) or '(none usable)'}", err=True)
    params = generator.prepare(params)
    if recorded is not None and recorded.model and recorded.model.hash and generator.model.hash \
            and recorded.model.hash != generator.model.hash:
        notes.append(f"warning: model hash {generator.model.hash} differs from the image's "
                     f"{recorded.model.hash}; the result will differ")
    if keep is not None and from_png is not None and recorded is not None:
        notes.append(f"note: {from_png.name} is image {recorded.batch_pos + 1} of a batch of {params.batch_size}; "
                     "re-running the whole batch so the result is bit-identical, saving only that image")
    for note in notes:
        click.echo(note, err=True)

    bar = _progress_bar(params.steps * params.batch_count)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    paths: list[Path] = []
    images: list[Any] = []

    def saved(im: Any) -> None:  # each image is on disk as soon as its batch is done: a Ctrl-C keeps them
        if keep is not None and im.batch_pos not in keep:
            return
        images.append(im)
        paths.append(save_image(im.image, out, im.seed, im.infotext))
        bar.write(f"seed {im.seed}: {paths[-1]}", file=sys.stdout)

    try:
        generator.generate(params, progress=progress, on_image=saved)
    finally:
        bar.close()
    if grid and len(images) > 1:
        path = save_grid(make_grid([im.image for im in images]), out, images[0].infotext)
        click.echo(f"grid: {path}")
    return paths


def register(cli: click.Group) -> None:
    from sdtune.prompts.emphasis import EMPHASES
    from sdtune.prompts.syntax import SYNTAXES

    @cli.command("generate")
    @click.argument("prompt", required=False)
    @click.option("--prompt", "-p", "prompt_option", metavar="TEXT", help="The prompt (instead of PROMPT).")
    @click.option("--negative", "--negative-prompt", "negative_prompt", metavar="TEXT", help="Negative prompt.")
    @click.option("--model", "-m", metavar="MODEL", help="Diffusers folder, .safetensors/.ckpt file, or `tiny` "
                  "(default: tiny).")
    @click.option("--vae", metavar="VAE", help="Replace the model's VAE (folder or file).")
    @click.option("--lora", "loras", multiple=True, metavar="FILE[:W]", help="Apply a LoRA (kohya, LoCon, LoHa, LoKr or "
                  "diffusers file) with weight W [default: 1]; repeat for several.")
    @click.option("--negative-lora", "negative_loras", multiple=True, metavar="FILE[:W]", help="Apply a LoRA to "
                  "the unconditional (negative) pass only, so images move away from what it learned (the 'wrong' "
                  "LoRA recipe: --negative-lora wrong.safetensors:0.5 --negative wrong; compare it with --lora, "
                  "docs/recipes.md); repeatable; needs --cfg > 1.")
    @click.option("--lora-dir", "lora_dirs", multiple=True, metavar="DIR", help="Folder searched (recursively) for "
                  "<lora:name:weight> prompt tags; repeatable; the folders of --lora files are searched too.")
    @click.option("--hypernetwork", "hypernetworks", multiple=True, metavar="FILE[:S]", help="Apply a hypernetwork "
                  "(A1111 .pt or sdtune .safetensors) with strength S [default: 1]; repeat to chain several in order.")
    @click.option("--hypernetwork-dir", "hypernetwork_dirs", multiple=True, metavar="DIR", help="Folder searched "
                  "for <hypernet:name:strength> prompt tags; repeatable.")
    @click.option("--embeddings", "embeddings", multiple=True, metavar="DIR|FILE", help="Textual Inversion "
                  "embeddings (a folder, searched recursively, or a file), usable by name in prompts; repeatable.")
    @click.option("--steps", type=int, help="Sampling steps  [default: 20]")
    @click.option("--cfg", "cfg_scale", type=float, help="Classifier-free guidance scale  [default: 7]")
    @click.option("--seed", type=int, help="Seed of the first image; image i gets seed+i  [default: -1 = random]")
    @click.option("--sampler", metavar="NAME", help="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M Karras', "
                  "dpmpp_2m  [default: DPM++ 2M Karras]; see --list-samplers")
    @click.option("--width", type=int, help="Image width, multiple of 8  [default: the model's native size]")
    @click.option("--height", type=int, help="Image height, multiple of 8  [default: the model's native size]")
    @click.option("--batch-size", "-b", type=int, help="Images per batch (run together)  [default: 1]")
    @click.option("--count", "-n", "batch_count", type=int, help="Number of batches  [default: 1]")
    @click.option("--clip-skip", type=int, help="A1111 clip skip: 1 = last CLIP layer, 2 = one before  [default: 1]")
    @click.option("--prompt-syntax", type=click.Choice(SYNTAXES), help="Weighting syntax of the prompts: a1111 "
                  "`(word:1.2)`, compel `word++` / `(word)1.2`, or auto-detect  [default: auto]")
    @click.option("--emphasis", type=click.Choice(EMPHASES), help="How weights reach the text encoder: original "
                  "(A1111, mean-preserving), none (multiply only), compel  [default: auto = compel for compel "
                  "syntax, else original]")
    @click.option("--refiner", metavar="MODEL", help="SDXL refiner for the last part of denoising.")
    @click.option("--refiner-start", type=float, help="Fraction of denoising done by the base model when a "
                  "refiner is used  [default: 0.8]")
    @click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True,
                  help="Folder for the PNGs (never overwritten; numbering continues).")
    @click.option("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N or mps  [default: auto]")
    @click.option("--dtype", type=click.Choice(DTYPES), help="Weights dtype  [default: auto]")
    @click.option("--from-png", type=click.Path(path_type=Path), metavar="PNG",
                  help="Repeat the settings stored in a PNG's A1111 metadata; other options override them.")
    @click.option("--no-grid", is_flag=True, help="Do not save a grid image when several images are made.")
    @click.option("--list-samplers", is_flag=True, help="Print the sampler names and exit.")
    def generate(prompt: str | None, prompt_option: str | None, model: str | None, vae: str | None, refiner: str | None, out: Path,
                 device: str | None, dtype: str | None, from_png: Path | None, no_grid: bool, list_samplers: bool,
                 **settings: Any) -> None:
        """Generate images from PROMPT (A1111 txt2img).

        Each image is saved as OUT/<number>-<seed>.png with A1111 `parameters` metadata and its seed and path
        are printed. `--from-png IMAGE.png` makes the same image again (bit for bit on the same machine).

        Example: sdtune generate "a red circle" --steps 20 --seed 1 -n 4
        """
        if list_samplers:
            from sdtune.generate import sampler_names

            click.echo("\n".join(sampler_names()))
            return
        if prompt is not None and prompt_option is not None:
            raise SdtuneError("give the prompt once: as PROMPT or with --prompt, not both")
        prompt = prompt if prompt is not None else prompt_option
        overrides = {k: v for k, v in settings.items() if v is not None}
        loras = overrides.pop("loras", ())
        lora_dirs = overrides.pop("lora_dirs", ())
        negative_loras = overrides.pop("negative_loras", ())
        run_generate(prompt, from_png=from_png, model=model, vae=vae, refiner=refiner, out=out, device=device,
                     dtype=dtype, grid=not no_grid, overrides=overrides, loras=loras,
                     lora_dirs=lora_dirs, negative_loras=negative_loras)
