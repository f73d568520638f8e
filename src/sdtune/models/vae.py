"""`--vae` swaps: load an AutoencoderKL from a diffusers folder or a single file (diffusers or LDM keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune.errors import SdtuneError


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _from_file(path: Path, family: str) -> Any:
    import tempfile

    from diffusers import AutoencoderKL

    from sdtune.formats.checkpoint import vae_to_ldm
    from sdtune.formats.safe_io import read_state_dict
    from sdtune.models import infer
    from sdtune.models.config_folder import write_model_configs
    from sdtune.models.single_file import load_with_diffusers

    sd = _strip_prefix(read_state_dict(path))
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        sd = vae_to_ldm(sd)  # diffusers layout: map to LDM so that one config inference serves both layouts
    if not any(k.startswith("encoder.down.") for k in sd) or not any(k.startswith("decoder.") for k in sd):
        raise SdtuneError(f"{path.name} is not a VAE (no encoder/decoder weights); run `sdtune info {path}` to see "
                          "what it is")
    cfg = infer.vae_config({k: tuple(v.shape) for k, v in sd.items()}, family, prefix="")
    with tempfile.TemporaryDirectory(prefix="sdtune-config-") as tmp:
        write_model_configs(Path(tmp), {"vae": cfg})
        return load_with_diffusers(AutoencoderKL, sd, Path(tmp), "vae", "VAE")


def load_vae(spec: str | Path, *, family: str, dtype: torch.dtype = torch.float32, like: Any = None) -> Any:
    """An AutoencoderKL from a diffusers folder (with config.json, or a pipeline folder's vae/) or a .safetensors/
    .ckpt/.pt VAE file. `like` (the model's own VAE) supplies the latent scaling factor and is checked against."""
    from diffusers import AutoencoderKL

    p = Path(spec).expanduser()
    if not p.exists():
        raise SdtuneError(f"VAE {str(spec)!r} not found; pass a diffusers VAE folder or a .safetensors/.ckpt VAE file")
    if p.is_dir():
        sub = p if (p / "config.json").is_file() else p / "vae"
        if not (sub / "config.json").is_file():
            raise SdtuneError(f"{p} is not a diffusers VAE folder (no config.json or vae/config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(sub), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise SdtuneError(f"could not load the VAE folder {sub} ({first})") from None
    else:
        vae = _from_file(p, family)
        if like is not None:
            vae.register_to_config(scaling_factor=like.config.scaling_factor)
        if family.startswith("sdxl"):
            vae.register_to_config(force_upcast=True)  # unknown VAE: decode SDXL in fp32 rather than risk overflow
    if like is not None and vae.config.latent_channels != like.config.latent_channels:
        raise SdtuneError(f"the VAE has {vae.config.latent_channels} latent channels but the model uses "
                          f"{like.config.latent_channels}; use a VAE made for this model family")
    return vae.to(dtype=dtype).eval()
