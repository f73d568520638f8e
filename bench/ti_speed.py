"""Textual Inversion training speed and memory: sdtune's `ti` method against a baseline written the way diffusers'
textual_inversion example trains (not a test).

    python bench/ti_speed.py [--model random|clip-l|tiny] [--steps 40] [--batch 2] [--resolution 64]

Both train the same model on the same images with the same batch size and number of steps, one torch thread,
each in its own subprocess (peak memory = that process's ru_maxrss, model loading included for both).

* sdtune: the shared loop with `ti`: latents encoded once before training, only an n x width tensor trained
  (spliced into the token-embedding output), AdamW state for those numbers only.
* baseline (diffusers' example, written here from its description): the token is added to the tokenizer and the
  embedding matrix resized; the whole token-embedding matrix is the optimised parameter (AdamW state for the whole
  vocabulary); the VAE encodes the batch's images every step; after every step all rows but the new token's are
  copied back from a saved copy.

Steps/s are measured over the steps after the first 3 (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(model: str):
    from sdtune.models.testing import tiny_pipeline

    if model == "random":
        return tiny_pipeline("sd1"), "tiny_pipeline('sd1'): random, CLIP vocabulary (49408), text width 64"
    if model == "clip-l":
        from diffusers import UNet2DConditionModel

        from sdtune.models.testing import UNET_CFG, clip_l_text_encoder

        pipe = tiny_pipeline("sd1")
        pipe.text_encoder = clip_l_text_encoder(seed=0)
        cfg = dict(UNET_CFG["sd1"], cross_attention_dim=768)
        pipe.unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                         norm_num_groups=32, **cfg).eval()
        return pipe, ("tiny_pipeline('sd1') with a random CLIP ViT-L/14-size text encoder (12 layers, width 768, "
                      "vocabulary 49408) and a tiny UNet")
    from sdtune.models import load_model

    loaded = load_model("tiny", device="cpu")
    return loaded.pipe, "the bundled tiny model (toy vocabulary)"


def loaded(pipe, name):
    import torch

    from sdtune.models.loading import LoadedModel

    return LoadedModel(pipe=pipe, family="sd1", prediction_type="epsilon", name=name, hash="0" * 10,
                       source=Path(f"<{name}>"), device=torch.device("cpu"), dtype=torch.float32)


def run_ours(args, data: Path, out: Path) -> dict:
    from sdtune.training import TrainConfig, train
    from sdtune.training.methods.textual_inversion import TIOptions

    pipe, _ = build(args.model)
    times = []
    cfg = TrainConfig(method="ti", data=str(data), out=str(out), steps=args.steps, lr=5e-3, batch_size=args.batch,
                      resolution=args.resolution, save_every=0, progress=False, tensorboard=False, seed=0,
                      options=TIOptions(token="<bench>", init="shape", vectors=1, templates="object"))
    t0 = time.perf_counter()
    train(cfg, model=loaded(pipe, args.model), on_step=lambda t, s, loss: times.append(time.perf_counter()),
          echo=lambda s: None)
    return {"total_s": time.perf_counter() - t0, "times": times}


def run_baseline(args, data: Path, out: Path) -> dict:
    import random

    import torch
    import torch.nn.functional as F

    from sdtune.training.data import scan_dataset
    from sdtune.training.images import to_tensor
    from sdtune.training.methods.textual_inversion import OBJECT_TEMPLATES

    pipe, _ = build(args.model)
    t0 = time.perf_counter()
    tok, te, vae, unet, sched = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler
    tok.add_tokens(["<bench>"])
    te.resize_token_embeddings(len(tok))
    new_id = tok.convert_tokens_to_ids("<bench>")
    init_id = tok.encode("shape", add_special_tokens=False)[0]
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[new_id] = emb.weight[init_id]
    original = emb.weight.detach().clone()
    for m in (vae, unet, te):
        m.requires_grad_(False)
    emb.weight.requires_grad_(True)
    te.train()
    opt = torch.optim.AdamW([emb.weight], lr=5e-3, weight_decay=0.01)
    items = scan_dataset(data, resolution=args.resolution).items
    pixels = [to_tensor(it.load()) for it in items]
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[new_id] = False
    times = []
    scale = vae.config.scaling_factor
    for step in range(args.steps):
        batch = torch.stack([pixels[rng.randrange(len(pixels))] for _ in range(args.batch)])
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample(gen) * scale
        prompts = [rng.choice(OBJECT_TEMPLATES).replace("[name]", "<bench>") for _ in range(args.batch)]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        hidden = te(ids)[0]
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            emb.weight[keep] = original[keep]
        times.append(time.perf_counter())
    return {"total_s": time.perf_counter() - t0, "times": times}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    result = (run_ours if args.run == "ours" else run_baseline)(args, data, out)
    t = result.pop("times")
    warm = 3 if len(t) > 6 else 0
    result["steps_per_s"] = (len(t) - 1 - warm) / (t[-1] - t[warm]) if len(t) > warm + 1 else float("nan")
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random", choices=("random", "clip-l", "tiny"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", choices=("ours", "baseline"))
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.run:
        child(args)
        return
    from prompt_encoding import machine

    import torch

    torch.set_num_threads(args.threads)
    from sdtune.toy.testing import write_toy_dataset

    print(machine())
    _, what = build(args.model) if args.model != "tiny" else (None, "the bundled tiny model (toy vocabulary)")
    print(f"model: {what}; {args.images} images at {args.resolution}px, batch {args.batch}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_toy_dataset(Path(tmp) / "data", args.images, size=64, shapes=("star",))
        res = {}
        for which in ("baseline", "ours"):
            cmd = [sys.executable, __file__, "--run", which, "--data", str(data), "--out", str(Path(tmp) / which),
                   "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--resolution",
                   str(args.resolution), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                raise SystemExit(f"{which} failed")
            res[which] = json.loads(line[7:])
            r = res[which]
            print(f"{which:9s}: {r['steps_per_s']:.2f} steps/s, peak RSS {r['maxrss_mb']:.0f} MB, "
                  f"whole run {r['total_s']:.1f} s")
        b, o = res["baseline"], res["ours"]
        print(f"speed-up: {o['steps_per_s'] / b['steps_per_s']:.2f}x steps/s; peak memory "
              f"{o['maxrss_mb'] / b['maxrss_mb']:.2f}x the baseline's")


if __name__ == "__main__":
    main()
