"""A1111 sampler names -> diffusers schedulers.

People copy settings from A1111 infotexts, so sdtune speaks A1111's sampler names and maps each one to the
diffusers scheduler that implements the same method (https://huggingface.co/docs/diffusers/api/schedulers/overview
lists the equivalences). Every scheduler is built `from_config` of the model's own scheduler so that the model's
noise schedule (betas, prediction_type, timestep spacing) is kept; only the sampling method changes.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from sdtune.errors import SdtuneError

log = logging.getLogger(__name__)

# Options that choose the sigma schedule or solver variant. They are reset explicitly for every sampler, otherwise
# a model shipped with e.g. a Karras DPM++ scheduler would silently turn "Euler" into "Euler Karras".
_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: the diffusers scheduler class name and the options that make it that sampler."""

    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    needs: str | None = None  # optional package the scheduler imports ("torchsde", "scipy")


def _karras(opts: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(opts or {}), "use_karras_sigmas": True}


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "euler_ancestral", "euler_a")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), needs="scipy"),
    Sampler("LMS Karras", "LMSDiscreteScheduler", _karras(), aliases=("k_lms_karras",), needs="scipy"),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2", "dpm_2")),
    Sampler("DPM2 Karras", "KDPM2DiscreteScheduler", _karras(), aliases=("k_dpm_2_karras", "dpm_2_karras")),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a", "dpm_2_ancestral", "dpm_2_a")),
    Sampler("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _karras(),
            aliases=("k_dpm_2_a_karras", "dpm_2_ancestral_karras")),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP_2M, aliases=("k_dpmpp_2m", "dpmpp_2m")),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _karras(_DPMPP_2M),
            aliases=("k_dpmpp_2m_karras", "dpmpp_2m_karras")),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde", "dpmpp_sde"), needs="torchsde"),
    Sampler("DPM++ SDE Karras", "DPMSolverSDEScheduler", _karras(),
            aliases=("k_dpmpp_sde_karras", "dpmpp_sde_karras"), needs="torchsde"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _DPMPP_2M_SDE,
            aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde")),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", _karras(_DPMPP_2M_SDE),
            aliases=("k_dpmpp_2m_sde_karras", "dpmpp_2m_sde_karras")),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("PNDM",)),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc_multistep",)),
    Sampler("DDPM", "DDPMScheduler"),
)

# A1111 (>= 1.8) writes "Sampler: DPM++ 2M, Schedule type: Karras"; older versions wrote "DPM++ 2M Karras".
SCHEDULE_TYPE_SUFFIXES = {"karras": "Karras"}


def _key(name: str) -> str:
    """Case-, space-, '_'- and '-'-insensitive lookup key; '+' counts as 'p' so 'DPM++' == 'dpmpp'."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower()).replace("+", "p")


_BY_KEY: dict[str, Sampler] = {}
for _s in SAMPLERS:
    for _n in (_s.name, *_s.aliases):
        _BY_KEY[_key(_n)] = _s


def sampler_names() -> list[str]:
    """The canonical A1111 names, in A1111's menu order."""
    return [s.name for s in SAMPLERS]


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by A1111 name or alias ("DPM++ 2M Karras", "dpmpp_2m_karras", "k_euler_a" ...)."""
    sampler = _BY_KEY.get(_key(name))
    if sampler is None:
        raise SdtuneError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())}")
    return sampler


def _available(package: str) -> bool:
    from diffusers.utils import is_scipy_available, is_torchsde_available

    return {"scipy": is_scipy_available, "torchsde": is_torchsde_available}[package]()


def usable(sampler: Sampler) -> bool:
    """Whether `sampler` runs here: its optional package is installed (torchsde has a fallback, scipy has none)."""
    return sampler.needs != "scipy" or _available("scipy")


def check_sampler(name: str) -> Sampler:
    """Resolve `name` and fail early (before any model is loaded) if it needs a package that has no fallback."""
    sampler = get_sampler(name)
    if not usable(sampler):
        raise SdtuneError(f"sampler {sampler.name!r} needs scipy, which is not installed: "
                          "`pip install scipy`, or choose another sampler such as Euler")
    return sampler


def _fallback(sampler: Sampler) -> tuple[Sampler, str | None]:
    """DPMSolverSDEScheduler imports torchsde; without it use diffusers' DPM++ SDE solver (a close relative)."""
    if sampler.needs == "torchsde" and not _available("torchsde"):
        opts = dict(_DPMPP_2M_SDE)
        if sampler.options.get("use_karras_sigmas"):
            opts["use_karras_sigmas"] = True
        sub = Sampler(sampler.name, "DPMSolverMultistepScheduler", opts)
        return sub, (f"sampler {sampler.name!r} needs torchsde, which is not installed; using "
                     "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++') instead "
                     "(`pip install torchsde` for the exact sampler)")
    return sampler, None


def make_scheduler(name: str, base_config: Any, prediction_type: str | None = None) -> Any:
    """Build the scheduler for A1111 sampler `name` from the model's scheduler config.

    `prediction_type` overrides the config's (a loader may know better, e.g. a v-prediction .ckpt whose config
    was guessed). A substitution (missing torchsde) is logged as a warning."""
    import diffusers

    sampler, note = _fallback(check_sampler(name))
    if note:
        log.warning("warning: %s", note)
    cls = getattr(diffusers, sampler.scheduler)
    accepted = set(inspect.signature(cls.__init__).parameters)
    overrides: dict[str, Any] = {k: False for k in _SCHEDULE_FLAGS}
    overrides.update(sampler.options)
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    config.update({k: v for k, v in overrides.items() if k in accepted})
    return cls.from_config(config)


def normalize_sampler_name(name: str, schedule_type: str | None = None) -> str:
    """Canonical name from an infotext's `Sampler` (+ newer A1111's `Schedule type`) fields."""
    if schedule_type:
        suffix = SCHEDULE_TYPE_SUFFIXES.get(_key(schedule_type))
        if suffix and _key(suffix) not in _key(name):
            candidate = _BY_KEY.get(_key(f"{name} {suffix}"))
            if candidate is not None:
                return candidate.name
    return get_sampler(name).name
