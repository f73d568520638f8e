"""`hypernetwork`: A1111-compatible hypernetworks (residual MLPs on the inputs of the UNet's attention to_k/to_v,
one pair per context width), trained on the shared loop with the text encoder and UNet frozen (text-encoder
outputs are cached per caption).

Files: sdtune's safetensors form by default, or A1111's .pt (`format = "a1111"`), which A1111 and ComfyUI load.
See `sdtune.adapters.hypernetwork`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.options import opt
from sdtune.training.methods.base import Batch, DiffusionLoss, TrainingMethod, trainable

if TYPE_CHECKING:
    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext


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
    format: str = opt("a1111", "File format: a1111 (.pt: A1111 and ComfyUI load it) or safetensors (sdtune only: "
                      "A1111 lists only .pt hypernetworks and ComfyUI reads none of its layers).",
                      section="hypernetwork", kind="str", choices=("a1111", "safetensors"))


# the activations ComfyUI's hypernetwork loader builds (it skips a file with any other, e.g. gelu or mish)
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign")


def comfyui_warnings(o: HypernetworkOptions) -> list[str]:
    """What ComfyUI does with these settings, as its loader is written: it skips activations outside
    COMFYUI_ACTIVATIONS, and its layer-norm + swish output differs from A1111's (A1111 loads both as trained)."""
    act = o.activation.lower()
    out = []
    if act not in COMFYUI_ACTIVATIONS:
        out.append(f"ComfyUI does not load hypernetworks with activation {act} (A1111 does); use one of "
                   f"{', '.join(COMFYUI_ACTIVATIONS)} for a file both load")
    if o.layer_norm and act == "swish":
        out.append("ComfyUI's output for swish with layer_norm differs from A1111's; A1111 applies it as trained")
    return out


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

    def prepare_data(self, ctx: TrainingContext) -> None:
        for warning in comfyui_warnings(self.options):
            ctx.echo(f"warning: {warning}")

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
    def apply_for_sampling(self, generator: Generator) -> Iterator[Generator]:
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

        assert self.config is not None  # set by setup
        u = float(torch.rand((), generator=step_generator(self.config.seed, step, stream="strength")))
        return low + (high - low) * u

    def teardown(self) -> None:
        from sdtune.adapters.hypernetwork.apply import uninstall

        if self.model is not None:
            uninstall(self.model.pipe.unet)

    def extra_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        """keep_uncond: the hypernetwork's empty-prompt prediction distilled towards the base model's (the
        hypernetwork switched off) on the same noisy latents."""
        weight = self.options.keep_uncond
        if not weight:
            return None
        assert self.model is not None
        unet = self.model.pipe.unet
        n = max(1, round(len(batch.captions) * self.options.keep_uncond_share))
        part = replace(batch, latents=batch.latents[:n], captions=[""] * n,
                       time_ids=None if batch.time_ids is None else batch.time_ids[:n])
        empty = self.conditioning(part)

        def base_prediction(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            entries, self.stack.entries = self.stack.entries, []
            try:
                with torch.no_grad():
                    return unet(noisy, t, **empty.unet_kwargs()).sample
            finally:
                self.stack.entries = entries

        return weight * diffusion_loss(part.latents, empty, target=base_prediction)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.network.flat_state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.network.load_flat_state_dict(dict(state), "the saved state")

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        from sdtune.adapters.hypernetwork.io import save_hypernetwork

        self.network.step = step
        meta = {**dict(metadata), "sdtune_step": str(step)}
        return save_hypernetwork(self.network, path, format=self.options.format, metadata=meta)
