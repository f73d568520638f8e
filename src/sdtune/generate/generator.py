"""`Generator`: txt2img with a model kept loaded between calls, A1111 seeds, and an optional SDXL refiner.

Seeding follows A1111: image i of a run (counting across batches) gets seed + i, and its starting noise is drawn
from its own CPU `torch.Generator`, so an image depends on its seed, not on the device or on which other images
share its batch. The same generator then feeds the sampler's per-step noise (ancestral/SDE samplers). Numerics
of a batched UNet call can differ from an unbatched one in the last bits, so a bit-exact repeat uses the same
batch size and batch position (recorded in the infotext as "Batch size"/"Batch pos").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from sdtune.errors import SdtuneError
from sdtune.generate.conditioning import PromptEmbeds, PromptEncoder
from sdtune.generate.extra_networks import ExtraNetwork
from sdtune.generate.guidance import Guide, guided_unet
from sdtune.generate.inference import optimize_for_inference
from sdtune.generate.negative_pass import unconditional_rows_with
from sdtune.generate.params import GenerationParams, ModelInfo, infotext_for
from sdtune.generate.pnginfo import add_infotext_field
from sdtune.generate.samplers import make_scheduler

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, steps total) over the whole run
Preview = Callable[[Any, Any], None]   # (pipeline, current latents) after each step, for live previews


class Control(Protocol):
    """Flags a caller sets from another thread while `generate` runs: `interrupted` stops after the current
    step (the images so far are returned, the current ones as they are, as A1111 does); `skipped` drops to the
    next batch (and is reset by the Generator)."""

    interrupted: bool
    skipped: bool


@dataclass
class GeneratedImage:
    """One image and how to make it again: `params` are the run's settings (seed = the run's first seed);
    `seed` is this image's own seed, `batch_pos` its place in its batch, `infotext` the A1111 text."""

    image: Any  # PIL.Image.Image
    seed: int
    params: GenerationParams
    infotext: str
    index: int = 0
    batch_pos: int = 0


def _is_loaded(model: Any) -> bool:
    return hasattr(model, "pipe") and hasattr(model, "family")


def _load(spec: Any, **kwargs: Any) -> Any:
    from sdtune.models import load_model

    return load_model(spec, **kwargs)


def _vae_info(vae: Any) -> ModelInfo | None:
    """A1111 records a separately loaded VAE as its file name and sha256[:10]."""
    if vae is None:
        return None
    path = Path(str(vae))
    info = ModelInfo(path.name)
    try:
        from sdtune.models.hashing import file_hash, folder_hash

        info.hash = folder_hash(path) if path.is_dir() else file_hash(path)
    except (ImportError, OSError):
        pass
    return info


class Generator:
    """Loads a model once and generates images from `GenerationParams`.

    model: a spec for `sdtune.models.load_model` (None/"tiny", a diffusers folder, a checkpoint file) or an
    already loaded `LoadedModel`. refiner: optional spec or LoadedModel to preload for `params.refiner`.
    encode_prompt: the text-conditioning hook (see `conditioning.PromptEncoder`); the default is
    `sdtune.prompts.WeightedPromptEncoder()` (pass one with an `EmbeddingRegistry` to use embeddings by name).
    loras: [(path, weight), ...] applied to the base model (see `set_loras`); negative_loras: the same, applied to
    the unconditional (negative) pass only (see `set_negative_loras`)."""

    def __init__(self, model: Any = None, *, vae: str | Path | None = None, device: str | None = None,
                 dtype: str | None = None, prediction_type: str | None = None, refiner: Any = None,
                 encode_prompt: PromptEncoder | None = None, loras: Any = None,
                 embeddings: Any = None, lora_dirs: Any = None, negative_loras: Any = None) -> None:
        self._load_kwargs = dict(device=device, dtype=dtype)
        self.model = model if _is_loaded(model) else _load(model, vae=vae, prediction_type=prediction_type,
                                                           **self._load_kwargs)
        if not _is_loaded(model):
            optimize_for_inference(self.model.pipe)
        if self.model.family == "sdxl-refiner":
            raise SdtuneError(f"{self.model.name} is an SDXL refiner, which cannot start from noise; "
                              "use an SDXL base model and pass this one as --refiner")
        self.vae_info = _vae_info(vae)
        if encode_prompt is None:
            from sdtune.prompts.weighted import WeightedPromptEncoder

            self.encode_prompt: PromptEncoder = WeightedPromptEncoder()
        else:
            self.encode_prompt = encode_prompt
        self._scheduler_configs: dict[int, dict[str, Any]] = {}
        self._remember_scheduler(self.model)
        self._refiners: dict[str, Any] = {}
        if refiner is not None:
            self.add_refiner(refiner)
        from sdtune.adapters.hypernetwork.extra_network import HypernetworkExtraNetwork
        from sdtune.adapters.lora.extra_network import LoraExtraNetwork

        self.loras = LoraExtraNetwork(self.model, lora_dirs, embedding_registry=lambda: self.embeddings.registry)
        self.hypernetworks = HypernetworkExtraNetwork(self.model)
        self._embeddings: Any = None  # EmbeddingLibrary, created on first use
        # activated in this order before every run (see `sdtune.generate.extra_networks`)
        self.extra_networks: list[ExtraNetwork] = [self.loras, self.hypernetworks]
        if loras:
            self.set_loras(loras)
        if negative_loras:
            self.set_negative_loras(negative_loras)
        if embeddings:
            library = self.embeddings
            for source in [embeddings] if isinstance(embeddings, (str, Path)) else embeddings:
                library.add_source(source, refresh=False)
            library.refresh()

    @property
    def lora_dirs(self) -> list[str | Path]:
        """Folders searched for `<lora:name:weight>` tags (then the folders of the fixed LoRAs); a live list."""
        return self.loras.dirs

    def set_loras(self, loras: Any) -> Any:
        """Use these LoRAs on the base model (not the refiner) from the next image on: [(path, weight), ...] or
        paths (weight 1); [] = none. Files are loaded once and kept; weights change without reloading anything
        (see `sdtune.adapters.lora.apply`). `<lora:name:weight>` tags of a prompt are added for its images."""
        return self.loras.set_fixed(loras)

    def set_negative_loras(self, loras: Any) -> Any:
        """LoRAs active only in classifier-free guidance's unconditional pass (UNet and, while the negative prompt
        is encoded, text encoder) of the base model: what they learned is steered away from, like a negative
        prompt. The "wrong" LoRA recipe: `set_negative_loras(["wrong.safetensors"])` and "wrong" in the negative
        prompt. Needs cfg > 1; [] = none. See `sdtune.generate.negative_pass`."""
        return self.loras.set_negative(loras)

    def set_hypernetworks(self, hypernetworks: Any = (), dirs: Any = None) -> None:
        """Hypernetworks on the base model from the next image on: [(path, strength), ...] or paths (strength 1),
        chained in order as in A1111, before any `<hypernet:name:strength>` tags of the prompt (looked up in
        `dirs`); [] = none. Files load once (see `sdtune.adapters.hypernetwork.apply`)."""
        self.hypernetworks.set_fixed(hypernetworks, dirs)

    @property
    def embeddings(self) -> Any:
        """The Textual Inversion embeddings usable by name in prompts: an `EmbeddingLibrary` watching folders and
        files (`.add_source(path)`, `.remove_source(path)`, `.names`). Files added, changed or removed there are
        picked up before the next image, without reloading the model."""
        if self._embeddings is None:
            from sdtune.adapters.textual_inversion.extra_network import EmbeddingExtraNetwork
            from sdtune.adapters.textual_inversion.library import EmbeddingLibrary

            enc = self.encode_prompt
            if not hasattr(enc, "embeddings"):
                raise SdtuneError("this Generator's prompt encoder does not take embeddings; use the default "
                                  "WeightedPromptEncoder")
            if enc.embeddings is None:
                from sdtune.prompts.embeddings import EmbeddingRegistry

                enc.embeddings = EmbeddingRegistry()
            self._embeddings = EmbeddingLibrary(pipe=self.model.pipe, registry=enc.embeddings)
            self.extra_networks.insert(0, EmbeddingExtraNetwork(self._embeddings))
        return self._embeddings

    # -- models ---------------------------------------------------------------------------------------------

    def _remember_scheduler(self, loaded: Any) -> None:
        """Keep the model's original scheduler config: every sampler is built from it, never from the last one."""
        self._scheduler_configs[id(loaded.pipe)] = dict(loaded.pipe.scheduler.config)
        loaded.pipe.set_progress_bar_config(disable=True)  # progress is reported through `progress`

    def add_refiner(self, refiner: Any) -> Any:
        """Load (or register an already loaded) refiner; `params.refiner` may then name it by spec or name."""
        loaded = refiner if _is_loaded(refiner) else _load(refiner, **self._load_kwargs)
        if not _is_loaded(refiner):
            optimize_for_inference(loaded.pipe)
        if not loaded.family.startswith("sdxl"):
            raise SdtuneError(f"refiner {loaded.name} is an {loaded.family} model; a refiner must be an SDXL "
                              "refiner or SDXL base model")
        from diffusers import StableDiffusionXLImg2ImgPipeline

        if not isinstance(loaded.pipe, StableDiffusionXLImg2ImgPipeline):  # an SDXL base used as refiner
            loaded.pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(loaded.pipe)
        self._remember_scheduler(loaded)
        for key in {str(refiner) if not _is_loaded(refiner) else None, loaded.name, str(loaded.source)} - {None}:
            self._refiners[key] = loaded
        return loaded

    def _refiner(self, spec: str) -> Any:
        return self._refiners.get(spec) or self.add_refiner(spec)

    def native_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: UNet sample size times the VAE's downscale factor."""
        pipe = self.model.pipe
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(w) * pipe.vae_scale_factor, int(h) * pipe.vae_scale_factor

    # -- generation -----------------------------------------------------------------------------------------

    def prepare(self, params: GenerationParams) -> GenerationParams:
        """Validate and complete params (seed, size) without running anything."""
        params = params.validate().with_seed()
        width, height = self.native_size()
        params = params.replace(width=params.width or width, height=params.height or height)
        factor = self.model.pipe.vae_scale_factor
        for name in ("width", "height"):
            value = getattr(params, name)
            if value % factor:
                raise SdtuneError(f"{name} {value} is not a multiple of {factor}, this model's VAE scale factor")
        if params.refiner and self.model.family != "sdxl":
            raise SdtuneError(f"a refiner needs an SDXL base model, but {self.model.name} is {self.model.family}; "
                              "drop --refiner or use an SDXL model")
        return params

    def _set_sampler(self, loaded: Any, sampler: str) -> None:
        config = self._scheduler_configs[id(loaded.pipe)]
        loaded.pipe.scheduler = make_scheduler(sampler, config, getattr(loaded, "prediction_type", None))

    def _noise(self, seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-image starting latents from per-image CPU generators (device-independent, batch-independent)."""
        import torch

        pipe = self.model.pipe
        shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        return latents.to(self.model.device, dtype=pipe.unet.dtype), gens

    def _embeds(self, loaded: Any, params: GenerationParams) -> PromptEmbeds:
        return self.encode_prompt(loaded.pipe, params.prompt, params.negative_prompt, num_images=params.batch_size,
                                  do_cfg=params.cfg_scale > 1.0, clip_skip=params.clip_skip, steps=params.steps,
                                  prompt_syntax=params.prompt_syntax, emphasis=params.emphasis)

    def generate(self, params: GenerationParams, *, progress: Progress | None = None, control: Control | None = None,
                 preview: Preview | None = None,
                 on_image: Callable[[GeneratedImage], None] | None = None) -> list[GeneratedImage]:
        """Run `params.batch_count` batches of `params.batch_size` images; returns them in seed order.

        progress: (steps done, total) after each step; control: interrupt / skip flags (see `Control`);
        preview: called with (pipeline, latents) after each step of the base model; on_image: called with each
        image as soon as its batch is done (the CLI saves it then, so a Ctrl-C keeps what was made)."""
        import torch

        params = self.prepare(params)
        refiner = self._refiner(params.refiner) if params.refiner else None
        base = self.model
        self._set_sampler(base, params.sampler)
        if refiner is not None:
            self._set_sampler(refiner, params.sampler)
        for net in list(self.extra_networks):  # embeddings picked up, <lora:...>/<hypernet:...> tags: first
            net.activate(params.prompt, params.negative_prompt)
        embeds = self._embeds(base, params)
        wanted = any(w != 0 for _, w in self.loras.negative)  # weight 0: no split, the base model's exact bits
        negative = self.loras.negative_pass if wanted and params.cfg_scale > 1.0 else None
        if wanted and negative is None:
            log.warning("--negative-lora has no effect at CFG scale %g: there is no unconditional pass; use a "
                        "CFG scale above 1", params.cfg_scale)
        if negative is not None and (self.loras.negative_touches("text_encoder")
                                     or self.loras.negative_touches("text_encoder_2")):
            with negative():
                embeds = embeds.with_negative_of(self._embeds(base, params))
        ref_embeds = self._embeds(refiner, params) if refiner is not None else None
        total = params.steps * params.batch_count
        split = params.refiner_start if refiner is not None else 1.0
        model_info = ModelInfo(base.name, getattr(base, "hash", None))
        refiner_info = ModelInfo(refiner.name, getattr(refiner, "hash", None)) if refiner is not None else None

        width, height = params.width, params.height
        assert width is not None and height is not None  # `prepare` filled in the native size
        out: list[GeneratedImage] = []
        for batch in range(params.batch_count):
            if control is not None and control.interrupted:
                break
            seeds = [params.seed + batch * params.batch_size + j for j in range(params.batch_size)]
            latents, gens = self._noise(seeds, height, width)

            def report(lo: float, hi: float, guide: Guide) -> Callable[..., dict]:
                def on_step(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
                    guide.step_done(i)
                    if control is not None and (control.interrupted or control.skipped):
                        pipe._interrupt = True  # diffusers: the remaining steps are skipped
                    if preview is not None and lo == 0.0 and "latents" in kwargs:
                        preview(pipe, kwargs["latents"])
                    if progress is not None:
                        n = max(1, getattr(pipe, "num_timesteps", 0) or params.steps)
                        frac = lo + (hi - lo) * min(1.0, (i + 1) / n)
                        progress(min(total, round((batch + frac) * params.steps)), total)
                    return kwargs
                return on_step

            common = dict(num_inference_steps=params.steps, guidance_scale=float(params.cfg_scale), generator=gens)
            base_guide = Guide(embeds.guidance)
            with torch.no_grad(), unconditional_rows_with(base.pipe, params.batch_size, negative), \
                    guided_unet(base.pipe, base_guide):
                result = base.pipe(**embeds.as_kwargs(), **common, height=params.height, width=params.width,
                                   latents=latents, output_type="latent" if refiner is not None else "pil",
                                   callback_on_step_end=report(0.0, split, base_guide),
                                   **({"denoising_end": split} if refiner is not None else {})).images
            if refiner is not None and ref_embeds is not None:
                # the refiner continues the step count where the base model stopped (prompt editing, AND)
                ref_guide = Guide(ref_embeds.guidance, start=base_guide.step)
                with torch.no_grad(), guided_unet(refiner.pipe, ref_guide):
                    result = refiner.pipe(**ref_embeds.as_kwargs(), **common, image=result, denoising_start=split,
                                          output_type="pil", callback_on_step_end=report(split, 1.0, ref_guide)).images
            if control is not None and control.skipped:
                control.skipped = False  # this batch is dropped; the next one starts
                continue
            for j, (image, seed) in enumerate(zip(result, seeds)):
                text = infotext_for(params, seed=seed, width=width, height=height, model=model_info,
                                    vae=self.vae_info, refiner=refiner_info, batch_pos=j)
                for net in self.extra_networks:
                    for key, value in net.infotext_fields():
                        text = add_infotext_field(text, key, value)
                out.append(GeneratedImage(image, seed, params, text, index=len(out), batch_pos=j))
                if on_image is not None:
                    on_image(out[-1])
        if progress is not None:
            progress(total, total)
        return out
