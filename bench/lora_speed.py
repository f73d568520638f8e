"""LoRA training speed and peak memory: sdtune's loop (latents and text encodings cached once) against a baseline
written the way diffusers' train_dreambooth_lora.py works (every step runs the VAE encoder on the images and the
text encoder on the captions), same model, LoRA (attention, rank 4), batch, resolution, steps, optimizer (AdamW),
one torch thread.

    nice -n 19 python bench/lora_speed.py [--model tiny|PATH] [--steps 60] [--batch 4] [--images 20]
    nice -n 19 python bench/lora_speed.py --arch sd1 --resolution 256 --batch 1 --steps 5   # SD1.5-size, random

Each variant runs in its own process (so peak RSS is its own); steps/s counts steps 2..N (the first step and the
setup, incl. sdtune's one-time latent caching, are reported separately). The bundled tiny model is used when it
is installed, else the same architecture with random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_folder(spec: str, work: Path) -> tuple[str, str]:
    """(model spec to load, description)."""
    if spec != "tiny":
        return spec, spec
    try:
        from sdtune.models.bundled import bundled_model_path

        bundled_model_path()
        return "tiny", "bundled tiny model"
    except Exception:
        pass
    from diffusers import StableDiffusionPipeline

    from sdtune.models.loading import quiet_loading
    from sdtune.toy.tiny import build_components

    folder = work / "tiny-random"
    if not (folder / "model_index.json").exists():
        comps = build_components(0)
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        with quiet_loading():
            pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder), "tiny architecture, random weights (bundled tiny model not installed)"


def sd1_random(seed: int = 0):
    """A LoadedModel with SD1.5's architecture (shipped configs) and random weights, built in memory."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.models.loading import LoadedModel
    from sdtune.models.tokenizer import clip_tokenizer

    cfg = Path(__file__).resolve().parents[1] / "src" / "sdtune" / "models" / "configs" / "sd1"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    sched = DDIMScheduler.from_config(DDIMScheduler.load_config(cfg / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return LoadedModel(pipe=pipe, family="sd1", prediction_type="epsilon", name="sd1-random", hash="0" * 10,
                       source=Path("<sd1-random>"), device=torch.device("cpu"), dtype=torch.float32)


def make_data(folder: Path, n: int) -> None:
    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset
    import random

    if folder.exists():
        return
    rng = random.Random(0)
    scenes = [world.random_scene(rng, shapes=("heart",), styles=("solid",)) for _ in range(n)]
    write_dataset(folder, scenes, [f"a {s.colour} sks shape on a {s.background} background" for s in scenes])


def run_ours(args: argparse.Namespace) -> dict:
    import torch

    from sdtune.training import TrainConfig, Trainer
    from sdtune.training.methods.lora import LoraOptions

    stamps: list[float] = []
    t0 = time.perf_counter()
    model = sd1_random() if args.arch == "sd1" else None
    cfg = TrainConfig(method="lora", model=args.model, data=args.data, out=tempfile.mkdtemp(dir=args.work),
                      steps=args.steps, lr=1e-4, batch_size=args.batch, save_every=0, progress=False,
                      tensorboard=False, resolution=args.resolution, options=LoraOptions(rank=4))
    t = Trainer(cfg, on_step=lambda tr, step, loss: stamps.append(time.perf_counter()), echo=lambda s: None,
                model=model)
    t.run()
    n = len(stamps) - 1
    return {"variant": "sdtune", "steps_per_s": n / (stamps[-1] - stamps[0]), "first_step_s": None,
            "setup_s": stamps[0] - t0, "peak_rss_mb": rss_mb(), "threads": torch.get_num_threads()}


def run_baseline(args: argparse.Namespace) -> dict:
    """Per step: images -> VAE encoder -> latent sample * scaling; captions -> tokenizer -> text encoder; noise,
    timesteps, add_noise; UNet (with the LoRA) -> MSE to the target; backward; clip; AdamW step."""
    import random

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from PIL import Image

    from sdtune.models import load_model
    from sdtune.training.images import fit_image, to_tensor

    t0 = time.perf_counter()
    m = sd1_random() if args.arch == "sd1" else load_model(args.model, device="cpu", dtype="fp32")
    pipe = m.pipe
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for mod in (unet, vae, te):
        mod.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    res = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    files = sorted(Path(args.data).glob("*.png"))
    pixels = [to_tensor(fit_image(Image.open(f).convert("RGB"), (res, res))) for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    sched = pipe.scheduler
    n_t = sched.config.num_train_timesteps
    scaling = vae.config.scaling_factor
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    unet.train()
    stamps = []
    for step in range(args.steps):
        idx = [rng.randrange(len(files)) for _ in range(args.batch)]
        x = torch.stack([pixels[i] for i in idx])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=gen) * scaling
            ids = tok([captions[i] for i in idx], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            hidden = te(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, n_t, (latents.shape[0],), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    n = len(stamps) - 1
    return {"variant": "baseline", "steps_per_s": n / (stamps[-1] - stamps[0]), "setup_s": stamps[0] - t0,
            "peak_rss_mb": rss_mb(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", choices=("sd1",), default=None, help="SD1.5-size model with random weights")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--variant", choices=("sdtune", "baseline"))
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        out = run_ours(args) if args.variant == "sdtune" else run_baseline(args)
        print(json.dumps(out))
        return
    work = Path(tempfile.mkdtemp(prefix="sdtune-lora-speed-"))
    model, desc = model_folder(args.model, work) if args.arch is None else ("tiny", "SD1.5 architecture (shipped "
                                                                                   "configs), random weights")
    data = work / "data"
    make_data(data, args.images)
    print(f"{platform.platform()}; {os.cpu_count()} cores; python {platform.python_version()}; torch "
          f"{torch.__version__} ({args.threads} thread(s))")
    print(f"model: {desc}; LoRA rank 4 on to_q/to_k/to_v/to_out.0; batch {args.batch}; {args.images} images; "
          f"{args.steps} steps; resolution {args.resolution or 'native'}; AdamW")
    results = {}
    for variant in ("baseline", "sdtune"):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--threads", str(args.threads), "--data", str(data), "--work", str(work)]
        cmd += ["--arch", args.arch] if args.arch else []
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"  {variant:9s} {r['steps_per_s']:.3f} steps/s ({1 / r['steps_per_s']:.2f} s/step)  setup "
              f"{r['setup_s']:.1f}s  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB")
    b, s = results["baseline"], results["sdtune"]
    print(f"sdtune / baseline: {s['steps_per_s'] / b['steps_per_s']:.2f}x steps/s, "
          f"{s['peak_rss_mb'] / b['peak_rss_mb']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
