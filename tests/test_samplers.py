"""A1111 sampler names -> diffusers schedulers: lookup, options, fallbacks. No model is loaded."""

from __future__ import annotations

import logging

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.generate.samplers import (
    _available,
    get_sampler,
    make_scheduler,
    normalize_sampler_name,
    sampler_names,
)
from sdtune.toy.tiny import SCHEDULER_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers schedulers

HAS_SCIPY = _available("scipy")
HAS_TORCHSDE = _available("torchsde")

EXPECTED = {
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 Karras": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM2 a Karras": "KDPM2AncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Karras": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler" if HAS_TORCHSDE else "DPMSolverMultistepScheduler",
    "DPM++ SDE Karras": "DPMSolverSDEScheduler" if HAS_TORCHSDE else "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "DDPM": "DDPMScheduler",
    "LMS": "LMSDiscreteScheduler",
    "LMS Karras": "LMSDiscreteScheduler",
}


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_builds_and_steps(name):
    """Each name gives its scheduler, keeps the model's schedule, and can take sampling steps."""
    if get_sampler(name).needs == "scipy" and not HAS_SCIPY:
        with pytest.raises(SdtuneError, match="scipy"):
            make_scheduler(name, SCHEDULER_CONFIG)
        return
    sched = make_scheduler(name, SCHEDULER_CONFIG)
    assert type(sched).__name__ == EXPECTED[name]
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps[:3]:
        eps = torch.randn(x.shape, generator=g)
        sched.scale_model_input(x, t)
        x = sched.step(eps, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_expected_table_covers_all_names():
    assert set(EXPECTED) == set(sampler_names())  # every name is checked for its scheduler class above
    for name in ("Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC", "PLMS", "DDPM", "DPM2 a"):
        assert name in sampler_names()


@pytest.mark.parametrize("spelling,canonical", [
    ("DPM++ 2M Karras", "DPM++ 2M Karras"),
    ("dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("k_dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("  dpm++ 2m  karras ", "DPM++ 2M Karras"),
    ("euler A", "Euler a"),
    ("k_euler_a", "Euler a"),
    ("euler_ancestral", "Euler a"),
    ("EULER", "Euler"),
    ("PNDM", "PLMS"),
    ("dpmpp-2m-sde", "DPM++ 2M SDE"),
    ("ddim", "DDIM"),
])
def test_lookup_ignores_case_spaces_and_separators(spelling, canonical):
    assert get_sampler(spelling).name == canonical


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(SdtuneError) as info:
        get_sampler("Euler b")
    msg = str(info.value)
    assert "Euler b" in msg and "DPM++ 2M Karras" in msg and "UniPC" in msg and "\n" not in msg


def test_karras_and_solver_options_are_explicit():
    """A model shipped with a Karras DPM++ scheduler must not make plain "DPM++ 2M" or "Euler" Karras."""
    base = dict(SCHEDULER_CONFIG, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
    assert make_scheduler("DPM++ 2M", base).config.use_karras_sigmas is False
    assert make_scheduler("DPM++ 2M", base).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("Euler", base).config.use_karras_sigmas is False
    karras = make_scheduler("DPM++ 2M Karras", SCHEDULER_CONFIG)
    assert karras.config.use_karras_sigmas is True and karras.config.algorithm_type == "dpmsolver++"
    sde = make_scheduler("DPM++ 2M SDE Karras", SCHEDULER_CONFIG)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_karras_sigmas is True
    assert make_scheduler("PLMS", SCHEDULER_CONFIG).config.skip_prk_steps is True


def test_prediction_type_is_kept_and_can_be_overridden():
    vpred = dict(SCHEDULER_CONFIG, prediction_type="v_prediction")
    for name in ("Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"):
        assert make_scheduler(name, vpred).config.prediction_type == "v_prediction"
    assert make_scheduler("Euler", SCHEDULER_CONFIG, "v_prediction").config.prediction_type == "v_prediction"


@pytest.mark.skipif(HAS_TORCHSDE, reason="torchsde installed: the real DPMSolverSDEScheduler is used")
def test_sde_without_torchsde_falls_back_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="sdtune.generate.samplers"):
        sched = make_scheduler("DPM++ SDE Karras", SCHEDULER_CONFIG)
    assert sched.config.algorithm_type == "sde-dpmsolver++" and sched.config.use_karras_sigmas is True
    assert "torchsde" in caplog.text


@pytest.mark.parametrize("sampler,schedule,expected", [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M Karras", "Karras", "DPM++ 2M Karras"),
    ("Euler a", "Automatic", "Euler a"),
    ("Euler a", "Karras", "Euler a"),  # no "Euler a Karras" sampler: keep the sampler
    ("UniPC", None, "UniPC"),
])
def test_normalize_with_new_a1111_schedule_type(sampler, schedule, expected):
    assert normalize_sampler_name(sampler, schedule) == expected
