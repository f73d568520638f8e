"""A1111's `/sdapi/v1` request bodies with A1111's field names, and their mapping to `GenerationParams`.

Fields sdtune implements are used; fields that change nothing in A1111 at their default values are accepted and
ignored; a field set to a value whose result sdtune cannot reproduce (hires fix, face restoration, tiling,
scripts, styles, variation seeds, ...) is refused with a 422 that names it, instead of a silently different image.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from sdtune.errors import SdtuneError
from sdtune.generate import GenerationParams
from sdtune.generate.params import MAX_BATCH_SIZE, MAX_SIDE, MAX_STEPS

# bounds of one request: larger values are refused (422) before anything is queued. Steps, sides and batch size
# are the run's own bounds (GenerationParams.validate); n_iter is stricter than MAX_BATCH_COUNT because one
# request holds the one worker until all its batches are done.
MAX_N_ITER = 100
SCHEDULERS = {"automatic": "", "karras": " Karras"}  # A1111 >= 1.9 schedule names sdtune maps
# values of A1111's sampler noise settings that give its default behaviour (clients often send them explicitly)
SAMPLER_DEFAULTS = {"eta": (0.0, 1.0), "s_churn": (0.0,), "s_tmax": (0.0, float("inf")), "s_tmin": (0.0,),
                    "s_noise": (1.0,), "s_min_uncond": (0.0,)}
# A1111 options (POST /options, override_settings) that change the pixels, with the value(s) sdtune's images match;
# the first is what GET /options reports. sdtune draws the starting noise from per-image CPU generators.
PIXEL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "eta_noise_seed_delta": (0,), "eta_ancestral": (1.0,), "eta_ddim": (0.0,), "randn_source": ("CPU",),
    **{k: SAMPLER_DEFAULTS[k] for k in ("s_churn", "s_tmin", "s_noise", "s_min_uncond")},  # also options in A1111
    "always_discard_next_to_last_sigma": (False,), "sgm_noise_multiplier": (False,), "samples_format": ("png",)}


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI (1.x). Unknown fields are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    n_iter: int = Field(1, ge=1, le=MAX_N_ITER)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int | None = Field(None, ge=8, le=MAX_SIDE)    # None: the model's native size (A1111: 512)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


# fields that, when set (truthy), would make A1111 draw something sdtune cannot
REFUSED = (("enable_hr", "the hires fix is not implemented"), ("restore_faces", "face restoration is not implemented"),
           ("tiling", "tiling is not implemented"), ("styles", "saved styles are not implemented"),
           ("subseed_strength", "variation seeds are not implemented"), ("script_name", "scripts are not implemented"),
           ("alwayson_scripts", "extensions' scripts are not implemented"),
           ("infotext", "settings from an infotext are not read by the API; send the fields"),
           ("disable_extra_networks", "extra networks are always applied"))


def _refuse(field: str, why: str) -> SdtuneError:
    return SdtuneError(f"{field}: {why}; leave it out (sdtune cannot reproduce what A1111 would make)")


def check_pixel_options(values: Mapping[str, Any], where: str) -> None:
    """Refuse an option value whose images sdtune would not make (`PIXEL_OPTIONS`); other options pass."""
    for key, value in values.items():
        accepted = PIXEL_OPTIONS.get(key)
        if accepted is not None and (isinstance(value, bool) != isinstance(accepted[0], bool) or value not in accepted):
            raise SdtuneError(f"{where} {key}={value!r}: sdtune makes images only as A1111 does with {key}="
                              f"{accepted[0]!r}; leave it out or send that value")


def unsupported_fields(req: Txt2ImgRequest) -> None:
    """Refuse fields that would make A1111 produce a different image than sdtune would."""
    for name, why in REFUSED:
        if getattr(req, name):
            raise _refuse(name, why)
    if req.seed_resize_from_h > 0 or req.seed_resize_from_w > 0:
        raise _refuse("seed_resize_from_w/h", "seed resizing is not implemented")
    for name, accepted in SAMPLER_DEFAULTS.items():
        value = getattr(req, name)
        if value is not None and value not in accepted:
            raise _refuse(name, "sampler noise settings other than A1111's defaults are not implemented")


def sampler_for(req: Txt2ImgRequest) -> str:
    """A1111's sampler_name (or sampler_index) plus its scheduler (1.9+) -> an sdtune sampler name. A1111's API
    default is Euler."""
    from sdtune.generate.samplers import check_sampler, sampler_names

    name = req.sampler_name or req.sampler_index or "Euler"
    scheduler = (req.scheduler or "automatic").strip().lower()
    if scheduler not in SCHEDULERS:
        raise SdtuneError(f"scheduler {req.scheduler!r} is not supported; use Automatic or Karras")
    if SCHEDULERS[scheduler] and not name.endswith(SCHEDULERS[scheduler]):
        base = check_sampler(name).name  # an unknown sampler is named as the client sent it
        if base + SCHEDULERS[scheduler] not in sampler_names():
            with_it = [n[:-len(SCHEDULERS[scheduler])] for n in sampler_names() if n.endswith(SCHEDULERS[scheduler])]
            raise SdtuneError(f"sampler {base!r} has no {req.scheduler} schedule in sdtune; use scheduler Automatic, "
                              f"or one of: {', '.join(with_it)}")
        name = base + SCHEDULERS[scheduler]
    return check_sampler(name).name


def to_params(req: Txt2ImgRequest, clip_skip: int) -> GenerationParams:
    """The GenerationParams a request means (validated; a one-line SdtuneError otherwise)."""
    unsupported_fields(req)
    switch = req.refiner_switch_at if req.refiner_switch_at is not None else 0.8
    params = GenerationParams(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
                              cfg_scale=req.cfg_scale, seed=req.seed, sampler=sampler_for(req), width=req.width,
                              height=req.height, batch_size=req.batch_size, batch_count=req.n_iter,
                              clip_skip=clip_skip, refiner=req.refiner_checkpoint or None, refiner_start=switch)
    return params.validate()


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options: any of A1111's option names; the ones sdtune has are applied."""

    model_config = ConfigDict(extra="allow")


class PngInfoRequest(BaseModel):
    image: str = Field(..., max_length=70_000_000)  # base64 (optionally a data: URL), about 50 MB of PNG
