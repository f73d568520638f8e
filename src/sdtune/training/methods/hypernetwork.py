"""`hypernetwork`: A1111-compatible hypernetworks (residual MLPs on the inputs of the UNet's attention to_k/to_v,
one pair per context width), trained on the shared loop with the text encoder and UNet frozen (text-encoder
outputs are cached per caption).

Files: sdtune's safetensors form by default, or A1111's .pt (`format = "a1111"`), which A1111 and ComfyUI load.
See `sdtune.adapters.hypernetwork`.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.config import opt
from sdtune.training.methods.base import Batch, Conditioning, DiffusionLoss, TargetFn, TrainingMethod, trainable

if TYPE_CHECKING:
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig


@dataclass
class HypernetworkOptions:
    layer_structure: str = opt("1, 2, 1", "Layer widths as multiples of the context width (A1111's layer "
                               "structure); must start and end with 1.", section="hypernetwork", kind="str",
                               metavar="LIST")
    activation: str = opt("linear", "Activation after each hidden layer (A1111 names: linear, relu, leakyrelu, "
                          "elu, swish, tanh, sigmoid, gelu, mish, silu, ...).", section="hypernetwork", kind="str")
    layer_norm: bool = opt(False, "LayerNorm after every Linear (the last one too, as A1111).",
                           section="hypernetwork", kind="bool")
    activate_output: bool = opt(False, "Apply the activation after the last Linear too.", section="hypernetwork",
                                kind="bool")
    weight_init: str = opt("Normal", "Initial weights of the Linear layers.", section="hypernetwork", kind="str",
                           choices=("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"))
    use_dropout: bool = opt(False, "Dropout in the hidden layers (0.3, A1111's default structure).",
                            section="hypernetwork", kind="bool")
    dropout_structure: str | None = opt(None, "Dropout per layer, one value per layer-structure entry, e.g. "
                                        "'0, 0.1, 0' (overrides --use-dropout).", section="hypernetwork", kind="str",
                                        metavar="LIST")
    last_layer_dropout: bool = opt(False, "With --use-dropout: dropout before the output layer too.",
                                   section="hypernetwork", kind="bool")
    sizes: list[int] = opt([], "Context widths that get modules (default: every attention width of the model, "
                           "e.g. SD1: 320 640 768 1280).", section="hypernetwork", kind="ints", metavar="WIDTH")
    keep_uncond: float = opt(0.0, "Weight of a term that keeps the unconditional (empty-prompt) prediction equal "
                             "to the base model's. A hypernetwork changes every prompt's context, the empty one "
                             "that classifier-free guidance subtracts too, so guidance cancels most of what it "
                             "learned; with the empty prompt kept, guidance amplifies it (e.g. 1; also set "
                             "--caption-dropout 0). Costs one more UNet pass per step.", section="hypernetwork",
                             kind="float", metavar="W")
    keep_uncond_share: float = opt(1.0, "Share of each batch the keep-uncond term uses (0.5 halves its extra "
                                   "cost).", section="hypernetwork", kind="float", metavar="F")
    min_strength: float = opt(1.0, "Each training step applies the hypernetwork at a strength drawn uniformly "
                              "from [min_strength, max_strength] (default 1, 1: always full). The learned style "
                              "then holds over that range of generation strengths and peaks inside it (toy world: "
                              "0.75-1.25 beat always-1 at strength 1).", section="hypernetwork", kind="float",
                              metavar="S")
    max_strength: float = opt(1.0, "Upper end of the training strength range (see --min-strength).",
                              section="hypernetwork", kind="float", metavar="S")
    strength_target: str = opt("full", "What a training step at strength s aims at. full: the training images at "
                               "every strength (the style holds over the strength range). blend: the base model's "
                               "prediction moved the share s of the way to the images (one more UNet pass per step). "
                               "mix: the images with weight s and the base model's own images for the same captions "
                               "(generated once) with weight 1 - s, so strength s draws the style on about the share s "
                               "of images (one more UNet pass on half the batch per step; max_strength <= 1).",
                               section="hypernetwork", kind="str", choices=("full", "blend", "mix"))
    format: str = opt("safetensors", "File format: safetensors (sdtune) or a1111 (.pt, A1111/ComfyUI).",
                      section="hypernetwork", kind="str", choices=("safetensors", "a1111"))


def settings_from_options(o: HypernetworkOptions) -> Any:
    from sdtune.adapters.hypernetwork.network import HypernetworkSettings, parse_floats

    ds = parse_floats(o.dropout_structure, "dropout structure") if o.dropout_structure else None
    return HypernetworkSettings(layer_structure=parse_floats(o.layer_structure, "layer structure"),
                                activation_func=o.activation.lower(), is_layer_norm=o.layer_norm,
                                weight_initialization=o.weight_init, activate_output=o.activate_output,
                                use_dropout=o.use_dropout or bool(ds and any(ds)), dropout_structure=ds,
                                last_layer_dropout=o.last_layer_dropout).check()


class HypernetworkMethod(TrainingMethod):
    name = "hypernetwork"
    summary = "Hypernetwork (A1111 architecture and files) on the UNet attention's k/v inputs."
    Options = HypernetworkOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        if self.options.format == "a1111":
            self.file_ext = ".pt"
        self.network: Any = None
        self.stack: Any = None
        self.base_latents: list[Any] = []

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        settings_from_options(options)
        if options.keep_uncond < 0:
            raise SdtuneError(f"hypernetwork keep_uncond {options.keep_uncond} must be 0 (off) or a positive weight")
        if not 0 < options.keep_uncond_share <= 1:
            raise SdtuneError(f"hypernetwork keep_uncond_share {options.keep_uncond_share} must be in (0, 1]")
        if not 0 <= options.min_strength <= options.max_strength:
            raise SdtuneError(f"hypernetwork min_strength {options.min_strength} must be in [0, max_strength "
                              f"{options.max_strength}]")
        if options.strength_target == "mix" and options.max_strength > 1:
            raise SdtuneError(f"hypernetwork max_strength {options.max_strength} must be at most 1 with strength_target "
                              "mix (a share of the images cannot exceed all of them)")
        if any(s < 1 for s in options.sizes):
            raise SdtuneError(f"hypernetwork sizes {options.sizes} must be positive widths, e.g. 320 640 768 1280")

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        from sdtune.adapters.hypernetwork.apply import Stack, context_widths, install
        from sdtune.adapters.hypernetwork.network import Hypernetwork

        self.model, self.config = model, config
        unet = model.pipe.unet
        widths = context_widths(unet)
        sizes = list(self.options.sizes) or widths
        unknown = sorted(set(sizes) - set(widths))
        if unknown:
            raise SdtuneError(f"hypernetwork sizes {', '.join(map(str, unknown))} are not attention widths of "
                              f"{model.name} ({', '.join(map(str, widths))})")
        self.network = Hypernetwork(sizes, settings_from_options(self.options), name=config.name,
                                    sd_checkpoint=str(model.hash)[:10] if model.hash else None,
                                    sd_checkpoint_name=str(model.name)).init_weights(config.seed)
        self.network.to(next(unet.parameters()).device)
        self.stack = Stack()
        self.stack.entries = [(self.network, 1.0)]
        install(unet, self.stack)
        return [{"params": trainable(self.network.parameters())}]

    def modules(self) -> list[torch.nn.Module]:
        return [self.network]

    def conditioning(self, batch: Batch) -> Any:
        """The text conditioning, with this step's training strength set (1 outside training mode)."""
        self.stack.entries = [(self.network, self.training_strength(batch.step))]
        return super().conditioning(batch)

    @contextlib.contextmanager
    def apply_for_sampling(self, generator: Any) -> Iterator[Any]:
        """Samples during training show the hypernetwork at strength 1, whatever the last step drew."""
        entries, self.stack.entries = self.stack.entries, [(self.network, 1.0)]
        try:
            with super().apply_for_sampling(generator) as g:
                yield g
        finally:
            self.stack.entries = entries

    def training_strength(self, step: int) -> float:
        """A strength drawn uniformly from [min_strength, max_strength], a pure function of (seed, step) so a
        resumed run draws the same; 1 in eval mode (validation, samples)."""
        low, high = self.options.min_strength, self.options.max_strength
        if low == high == 1 or not self.network.training:
            return 1.0
        from sdtune.training.noise import step_generator

        u = float(torch.rand((), generator=step_generator(self.config.seed, step, stream="strength")))
        return low + (high - low) * u

    def teardown(self) -> None:
        from sdtune.adapters.hypernetwork.apply import uninstall

        if self.model is not None:
            uninstall(self.model.pipe.unet)

    def base_prediction(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction with the hypernetwork switched off (no gradient)."""
        assert self.model is not None
        entries, self.stack.entries = self.stack.entries, []
        try:
            with torch.no_grad():
                return self.model.pipe.unet(noisy, t, **cond.unet_kwargs()).sample
        finally:
            self.stack.entries = entries

    def target(self, batch: Batch, cond: Conditioning) -> TargetFn | None:
        """strength_target blend: at strength s the step matches base + s * (images' target - base)."""
        strength = self.stack.entries[0][1]
        if self.options.strength_target != "blend" or strength == 1:
            return None

        def blended(noisy: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            base = self.base_prediction(noisy, t, cond)
            return base + strength * (target.to(base.dtype) - base)

        return blended

    def prepare_data(self, trainer: Any) -> None:
        """strength_target mix: the base model's image for every training caption (seed: the image's index),
        generated once with the hypernetwork switched off, cached in OUT/base_images and encoded."""
        if self.options.strength_target != "mix":
            return
        from sdtune.adapters.hypernetwork.apply import install, uninstall
        from sdtune.training.prior import generated_images

        assert self.model is not None
        unet = self.model.pipe.unet
        uninstall(unet)
        try:
            images = generated_images(trainer, [item.caption for item in trainer.dataset.items], "base_images",
                                      "hypernetwork mix", "base image")
        finally:
            install(unet, self.stack)
        self.base_latents = trainer._encode(images, flip_variants=False)
        self.base_resolution = trainer.resolution
        self.sample_latents = trainer.latents_mode == "sample"

    def extra_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        terms = [t for t in (self._keep_uncond_loss(batch, diffusion_loss), self._mix_loss(batch, diffusion_loss))
                 if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _keep_uncond_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        """keep_uncond: the hypernetwork's empty-prompt prediction distilled towards the base model's (the
        hypernetwork switched off) on the same noisy latents."""
        weight = self.options.keep_uncond
        if not weight:
            return None
        n = max(1, round(len(batch.captions) * self.options.keep_uncond_share))
        part = replace(batch, latents=batch.latents[:n], captions=[""] * n,
                       time_ids=None if batch.time_ids is None else batch.time_ids[:n])
        empty = self.conditioning(part)
        return weight * diffusion_loss(part.latents, empty,
                                       target=lambda noisy, t, _: self.base_prediction(noisy, t, empty))

    def _mix_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        """strength_target mix at strength s < 1: the base images of the first half of the batch, with their
        captions, weighted (1 - s) / s against the training images (the optimum is the s-mixture)."""
        strength = self.stack.entries[0][1]
        if self.options.strength_target != "mix" or not 0 < strength < 1 or not batch.indices:
            return None
        n = max(1, len(batch.indices) // 2)
        rng = random.Random(f"{self.config.seed if self.config else 0}:mix:{batch.step}")
        gen = torch.Generator("cpu").manual_seed(rng.randrange(2**63)) if self.sample_latents else None
        device = batch.latents.device
        latents = torch.stack([self.base_latents[i].get(False, generator=gen) for i in batch.indices[:n]]).to(device)
        ids = None
        if batch.time_ids is not None:
            r = float(self.base_resolution)
            ids = torch.tensor([[r, r, 0.0, 0.0, r, r]] * n, device=device)
        cond = self.conditioning(Batch(latents=latents, captions=batch.captions[:n], time_ids=ids, step=batch.step))
        return (1 - strength) / strength * diffusion_loss(latents.to(batch.latents.dtype), cond)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.network.flat_state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.network.load_flat_state_dict(dict(state), "the saved state")

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        from sdtune.adapters.hypernetwork.io import save_hypernetwork

        self.network.step = step
        meta = {**dict(metadata), "sdtune_step": str(step)}
        return save_hypernetwork(self.network, path, format=self.options.format, metadata=meta)
