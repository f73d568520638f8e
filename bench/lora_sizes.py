"""LoRA file sizes at rank 4: the tiny model (measured on files written by sdtune's kohya writer) and SD1.5 / SD2 /
SDXL (layer shapes from the shipped configs in src/sdtune/models/configs, models built on the meta device, so no
weights are needed; the files are written too, with zero factors, to measure header overhead).

Target sets:
  attn        UNet attention projections to_q/to_k/to_v/to_out.0 (diffusers' LoRA training scripts)
  kohya       + proj_in/proj_out and feed-forward of the UNet transformers, + text encoder(s) q/k/v/out_proj, fc1, fc2
              (kohya networks.lora defaults, text encoder trained)
  kohya+conv  + resnet 3x3 convs, time-embedding projections, shortcut, down/upsampler convs (LoCon, conv_dim 4)

Usage: python bench/lora_sizes.py [--rank 4]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

from sdtune.adapters.lora import save_lora
from sdtune.adapters.lora.testing import ATTENTION, CONV, KOHYA_UNET, TEXT, random_network

TARGETS = {
    "attn": dict(unet=ATTENTION, text=()),
    "kohya": dict(unet=KOHYA_UNET, text=TEXT),
    "kohya+conv": dict(unet=KOHYA_UNET + CONV, text=TEXT),
}


def meta_components(family: str) -> dict:
    """UNet and text encoder(s) of a real model of `family`, built on the meta device from the shipped configs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.models.infer import family_config

    def clean(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    comps: dict = {}
    with torch.device("meta"):
        comps["unet"] = UNet2DConditionModel.from_config(clean(family_config(family, "unet")))
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**clean(family_config(family, "text_encoder"))))
        if family == "sdxl":
            comps["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**clean(family_config(family, "text_encoder_2"))))
    return comps


def tiny_components() -> dict:
    """The bundled tiny model when it is installed, else its architecture with random weights."""
    from sdtune.toy.tiny import build_components, tiny_model_path

    if (tiny_model_path() / "model_index.json").is_file():
        from sdtune.models import load_model

        return dict(load_model("tiny", device="cpu").pipe.components)
    return build_components(seed=0)


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.platform()}; python {sys.version.split()[0]}; torch {torch.__version__}")
    models = {"tiny (sdtune toy, SD1 arch.)": tiny_components, "SD1.5": lambda: meta_components("sd1"),
              "SD2.x": lambda: meta_components("sd2"), "SDXL base": lambda: meta_components("sdxl")}
    header = f"| model | targets | modules | LoRA params | kohya fp16 file | kohya fp32 file | % of UNet+TE params |"
    print(f"rank {args.rank} (conv rank {args.rank}), alpha = rank/2; sizes of .safetensors files written by sdtune")
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in models.items():
            comps = make()
            base = sum(p.numel() for c in ("unet", "text_encoder", "text_encoder_2") if c in comps
                       for p in comps[c].parameters())
            for tname, targets in TARGETS.items():
                net = random_network(comps, rank=args.rank, zeros=True, **targets)
                sizes = []
                for dtype in (torch.float16, torch.float32):
                    path = save_lora(net, Path(tmp) / f"{tname}.safetensors", dtype=dtype)
                    sizes.append(path.stat().st_size)
                params = net.parameters()
                print(f"| {label} | {tname} | {len(net.modules)} | {params:,} | {mb(sizes[0])} | {mb(sizes[1])} | "
                      f"{100 * params / base:.2f}% |")


if __name__ == "__main__":
    main()
