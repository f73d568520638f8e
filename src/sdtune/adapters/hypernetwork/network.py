"""The hypernetwork itself: for each context width, a pair of residual MLPs (one for the input of attention's
`to_k`, one for `to_v`): `y = x + mlp(x) * strength`.

The module layout follows A1111's hypernetworks so that their .pt files load unchanged: each MLP is an
`nn.Sequential` named `linear` holding, per layer i, Linear(dim*ls[i] -> dim*ls[i+1]), then the activation (not
after the last Linear unless `activate_output`), then a LayerNorm (`is_layer_norm`, after the last Linear too), then
a Dropout when the dropout structure asks for one. State-dict keys are therefore `linear.<index>.weight/bias`, the
index counting activations, norms and dropouts as well. The code here is sdtune's own; only the file layout is
shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence, cast

import torch
from torch import nn

from sdtune.errors import SdtuneError

# Activation names as A1111 accepts them (its list: a few fixed names plus every torch.nn activation class
# lower-cased). "swish" means Hardswish there, kept for file compatibility.
_FIXED = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
          "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_TORCH = ("CELU", "GELU", "GLU", "Hardshrink", "Hardsigmoid", "Hardswish", "Hardtanh", "LogSigmoid", "Mish", "PReLU",
          "ReLU6", "RReLU", "SELU", "SiLU", "Softplus", "Softshrink", "Softsign", "Tanhshrink", "Softmin", "Softmax",
          "LogSoftmax")
ACTIVATIONS: dict[str, type[nn.Module]] = {**{n.lower(): getattr(nn, n) for n in _TORCH if hasattr(nn, n)}, **_FIXED}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
DEFAULT_LAYERS = (1.0, 2.0, 1.0)


def parse_floats(text: Any, what: str) -> list[float]:
    """'1, 2, 1' / [1, 2, 1] -> [1.0, 2.0, 1.0]."""
    items = text if isinstance(text, (list, tuple)) else [s for s in str(text).replace(" ", "").split(",") if s]
    try:
        return [float(x) for x in items]
    except (TypeError, ValueError):
        raise SdtuneError(f"{what} {text!r} must be comma-separated numbers, e.g. 1, 2, 1") from None


def dropout_structure_for(layers: Sequence[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's default dropout per layer when only `use_dropout` is given: 0 for the input, 0.3 for hidden
    layers, 0.3 or 0 before the output (last_layer_dropout), 0 for the output."""
    if not use_dropout:
        return [0.0] * len(layers)
    return [0.0] + [0.3] * (len(layers) - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


@dataclass
class HypernetworkSettings:
    """What shapes a hypernetwork (stored in its file, A1111's names)."""

    layer_structure: list[float] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    activation_func: str = "linear"
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | None = None
    last_layer_dropout: bool = False

    def check(self) -> "HypernetworkSettings":
        ls = self.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(not math.isfinite(x) or x <= 0 for x in ls):
            raise SdtuneError(f"layer structure {_fmt(ls)} must start and end with 1 and be positive, e.g. 1, 2, 1")
        if self.activation_func.lower() not in ACTIVATIONS:
            raise SdtuneError(f"activation {self.activation_func!r} is unknown; use one of "
                              f"{', '.join(sorted(ACTIVATIONS))}")
        if self.weight_initialization not in WEIGHT_INITS:
            raise SdtuneError(f"weight initialization {self.weight_initialization!r} is unknown; use one of "
                              f"{', '.join(WEIGHT_INITS)}")
        ds = self.dropouts()
        if len(ds) != len(ls) or any(not 0 <= p < 1 for p in ds):
            raise SdtuneError(f"dropout structure {_fmt(ds)} needs one value in [0, 1) per layer "
                              f"({len(ls)} for layer structure {_fmt(ls)})")
        self.layer_structure = [float(x) for x in ls]
        self.dropout_structure = ds  # normalised: always explicit, as A1111 writes it
        self.use_dropout = any(p > 0 for p in ds)
        return self

    def dropouts(self) -> list[float]:
        if self.dropout_structure is not None:
            return [float(p) for p in self.dropout_structure]
        return dropout_structure_for(self.layer_structure, self.use_dropout, self.last_layer_dropout)


def _fmt(values: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


class HypernetworkModule(nn.Module):
    """One residual MLP: forward(x, strength) = x + linear(x) * strength."""

    def __init__(self, dim: int, settings: HypernetworkSettings) -> None:
        super().__init__()
        ls, act = settings.layer_structure, settings.activation_func.lower()
        drops = settings.dropouts()
        layers: list[nn.Module] = []
        for i in range(len(ls) - 1):
            last = i == len(ls) - 2
            out_dim = int(dim * ls[i + 1])
            layers.append(nn.Linear(int(dim * ls[i]), out_dim))
            if act != "linear" and (not last or settings.activate_output):
                layers.append(ACTIVATIONS[act]())
            if settings.is_layer_norm:
                layers.append(nn.LayerNorm(out_dim))
            if drops[i + 1] > 0:
                layers.append(nn.Dropout(p=drops[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.dim = dim

    def init_weights(self, settings: HypernetworkSettings, generator: torch.Generator | None = None) -> None:
        init, act = settings.weight_initialization, settings.activation_func.lower()
        nonlin: Literal["leaky_relu", "relu"] = "leaky_relu" if act == "leakyrelu" else "relu"
        with torch.no_grad():
            for layer in self.linear:
                if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    continue
                w, b = layer.weight, layer.bias
                # A1111 gives LayerNorm weights N(0, 0.01) whatever the init: the residual starts near identity.
                # (A unit LayerNorm gain would add a delta as large as the context itself at step 0.)
                if init == "Normal" or isinstance(layer, nn.LayerNorm):
                    w.normal_(0.0, 0.01, generator=generator)
                elif init == "XavierUniform":
                    nn.init.xavier_uniform_(w, generator=generator)
                elif init == "XavierNormal":
                    nn.init.xavier_normal_(w, generator=generator)
                elif init == "KaimingUniform":
                    nn.init.kaiming_uniform_(w, nonlinearity=nonlin, generator=generator)
                else:
                    nn.init.kaiming_normal_(w, nonlinearity=nonlin, generator=generator)
                b.zero_()

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        first = self.linear[0]
        assert isinstance(first, nn.Linear)  # __init__ always starts the stack with a Linear
        w = first.weight
        delta = self.linear(x.to(w.dtype))
        return x + (delta * strength).to(x.dtype)


class Hypernetwork(nn.Module):
    """The modules of one hypernetwork: `layers[str(width)]` = ModuleList([k_module, v_module]), plus the file's
    descriptive fields (name, step, base checkpoint)."""

    def __init__(self, widths: Iterable[int], settings: HypernetworkSettings | None = None, *, name: str = "",
                 step: int = 0, sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None) -> None:
        super().__init__()
        self.settings = (settings or HypernetworkSettings()).check()
        self.widths = sorted({int(w) for w in widths})
        if not self.widths:
            raise SdtuneError("a hypernetwork needs at least one layer width")
        self.layers = nn.ModuleDict({str(w): nn.ModuleList([HypernetworkModule(w, self.settings),
                                                            HypernetworkModule(w, self.settings)])
                                     for w in self.widths})
        self.name, self.step = name, step
        self.sd_checkpoint, self.sd_checkpoint_name = sd_checkpoint, sd_checkpoint_name
        self.extra_metadata: dict[str, Any] = {}

    def init_weights(self, seed: int = 0) -> "Hypernetwork":
        gen = torch.Generator("cpu").manual_seed(seed)
        for _, pair in self.module_pairs():
            for m in pair:
                m.init_weights(self.settings, gen)
        return self

    def pair(self, width: int) -> nn.ModuleList | None:
        return cast(nn.ModuleList, self.layers[str(width)]) if str(width) in self.layers else None

    def module_pairs(self) -> Iterator[tuple[str, tuple[HypernetworkModule, HypernetworkModule]]]:
        """(width as in `layers`, (k module, v module)) for every width, in order."""
        for w, pair in self.layers.items():
            k, v = cast(nn.ModuleList, pair)  # __init__ builds every value as ModuleList([k_module, v_module])
            yield w, (cast(HypernetworkModule, k), cast(HypernetworkModule, v))

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """`<width>.<k|v>.linear.<n>.<weight|bias>` -> tensor (the safetensors form's keys)."""
        out = {}
        for w, pair in self.module_pairs():
            for kv, m in zip("kv", pair):
                for key, t in m.state_dict().items():
                    out[f"{w}.{kv}.{key}"] = t
        return out

    def load_flat_state_dict(self, state: dict[str, torch.Tensor], source: str = "the file") -> None:
        want = self.flat_state_dict()
        if set(state) != set(want):
            extra, missing = sorted(set(state) - set(want)), sorted(set(want) - set(state))
            raise SdtuneError(f"{source}: hypernetwork tensors do not match its settings (missing: "
                              f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})")
        bad = [k for k, t in state.items() if tuple(t.shape) != tuple(want[k].shape)]
        if bad:
            k = bad[0]
            raise SdtuneError(f"{source}: {k} has shape {list(state[k].shape)}, its settings give "
                              f"{list(want[k].shape)}")
        with torch.no_grad():
            for w, pair in self.module_pairs():
                for kv, m in zip("kv", pair):
                    prefix = f"{w}.{kv}."
                    m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        s = self.settings
        extra = []
        if s.is_layer_norm:
            extra.append("layer norm")
        if any(p > 0 for p in s.dropouts()):
            extra.append(f"dropout {_fmt(s.dropouts())}")
        if s.activate_output:
            extra.append("activated output")
        return (f"hypernetwork {self.name or '(unnamed)'}: widths {', '.join(map(str, self.widths))}, layers "
                f"{_fmt(s.layer_structure)}, {s.activation_func}" + (", " + ", ".join(extra) if extra else "")
                + f", {self.n_params():,} parameters, step {self.step}")
