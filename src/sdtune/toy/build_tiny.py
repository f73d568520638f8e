"""Train the bundled `tiny` model on the toy world (fixed seed, CPU is enough): `sdtune toy build-tiny STAGE ...`.

It keeps a loop of its own rather than the shared training loop (`training.loop`): that loop personalises a
finished model (frozen VAE, latents cached once, one method's weights trained), while building the tiny model
trains the VAE itself and then the UNet and text encoder from random weights on freshly rendered images.

    sdtune toy build-tiny vae   --work runs/tiny --steps 700
    sdtune toy build-tiny unet  --work runs/tiny --minutes 50
    sdtune toy build-tiny export --work runs/tiny --out src/sdtune/assets/tiny [--ema]

Each stage checkpoints to --work every few minutes and resumes from there if restarted.
The VAE learns the whole world (every shape and style: it is a general image codec, as SD's VAE is);
the UNet and text encoder learn only the base training distribution (`world.base_training_sample`), with
`world.FORGOTTEN_WORDS` as extra tokens that export removes again.

`unet --init-from MODEL_DIR` continues from an exported model instead of random weights (fresh optimizer, same
schedule shape): the bundled model is the 2058-step export of a run on the world before forgotten words
(commit 18610e6), continued this way for the forgotten words (docs/toy-world.md):

    sdtune toy build-tiny unet --work runs/tiny2 --init-from src/sdtune/assets/tiny --lr 4e-4 \
        --steps 1200 --minutes 28 --samples 30000
    sdtune toy build-tiny unet --work runs/tiny2 --lr 4e-4 --steps 2200 --minutes 14    # resumes at 1200
    sdtune toy build-tiny export --work runs/tiny2 --out src/sdtune/assets/tiny --ema
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdtune.formats.safe_io import save_safetensors_atomic
from sdtune.toy import world
from sdtune.toy.tiny import SCHEDULER_CONFIG, build_components, write_tokenizer

torch.set_num_threads(int(os.environ.get("SDTUNE_THREADS", "2")))


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def atomic_save(tensors: dict, path: Path) -> None:
    save_safetensors_atomic(tensors, path)


def prefixed(module: torch.nn.Module, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def train_vae(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_tokenizer(work / "tokenizer")
    comps = build_components(seed=0, tokenizer_dir=work / "tokenizer")
    vae = comps["vae"]
    rng = random.Random(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = 2e-3 * (0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        # Noise is incompressible: keep it rare so it does not dominate the loss and cost colour fidelity.
        styles = [("noisy",) if rng.random() < 0.05 else world.CLEAN_STYLES + ("blurry",) for _ in range(args.batch)]
        x = to_tensor([world.render(world.random_scene(rng, styles=st)) for st in styles])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        colour_term = F.mse_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))  # low frequencies: the colours the judge reads
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 2.0 * colour_term + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    # Scaling factor: latents scaled to unit variance, as SD does (its 0.18215).
    with torch.no_grad():
        x = to_tensor([world.render(world.random_scene(rng, styles=world.STYLES)) for _ in range(512)])
        std = vae.encode(x).latent_dist.mean.std().item()
    atomic_save(prefixed(vae, "vae"), work / "vae.safetensors")
    (work / "vae_scale.txt").write_text(f"{1.0 / std:.5f}\n")
    print(f"vae done, scaling_factor {1.0 / std:.5f}")


def load_vae(work: Path):
    """Components with the trained VAE: from the stage `vae` in `work`, or from the model `unet --init-from` named."""
    init = work / "init_from.txt"
    if init.exists():
        return load_model(Path(init.read_text().strip()))
    comps = build_components(seed=0, tokenizer_dir=work / "tokenizer")
    vae = comps["vae"]
    vae.load_state_dict(unprefixed(load_file(str(work / "vae.safetensors")), "vae"))
    vae.register_to_config(scaling_factor=float((work / "vae_scale.txt").read_text()))
    return comps


def load_model(folder: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))


def start_word(concept: str) -> str:
    """The word whose embedding row a forgotten word starts from."""
    return "outlined" if concept in world.WORDLESS_STYLES else "shape"


def add_forgotten_words(comps: dict):
    """Put a copy of the tokenizer with world.FORGOTTEN_WORDS as tokens in `comps` and grow the text encoder (rows
    start at the word "shape"/"outlined" plus noise); returns the original tokenizer, which export restores."""
    base_tok, te = comps["tokenizer"], comps["text_encoder"]
    tok = comps["tokenizer"] = copy.deepcopy(base_tok)
    tok.add_tokens(list(world.FORGOTTEN_WORDS.values()))
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for concept, word in world.FORGOTTEN_WORDS.items():
            row = emb[tok.convert_tokens_to_ids(start_word(concept) + "</w>")]
            emb[tok.convert_tokens_to_ids(word)] = row + 0.1 * row.std() * torch.randn(row.shape, generator=g)
    return base_tok


def make_dataset(comps, n: int, seed: int):
    rng = random.Random(seed)
    samples = [world.base_training_sample(rng) for _ in range(n)]
    vae, tok = comps["vae"], comps["tokenizer"]
    latents = []
    with torch.no_grad():
        for i in range(0, n, 256):
            x = to_tensor([world.render(s) for s, _ in samples[i:i + 256]])
            latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    ids = tok([c for _, c in samples], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    return torch.cat(latents), ids, empty


def train_unet(args) -> None:
    work = Path(args.work)
    if args.init_from:
        work.mkdir(parents=True, exist_ok=True)
        (work / "init_from.txt").write_text(str(Path(args.init_from).resolve()) + "\n")
    comps = load_vae(work)
    add_forgotten_words(comps)
    unet, te = comps["unet"], comps["text_encoder"]
    data_path = work / "dataset.safetensors"
    if data_path.exists():
        d = load_file(str(data_path))
        latents, ids, empty = d["latents"], d["ids"], d["empty"]
    else:
        latents, ids, empty = make_dataset(comps, args.samples, seed=2)
        atomic_save({"latents": latents, "ids": ids, "empty": empty}, data_path)
    print(f"dataset {tuple(latents.shape)} latent std {latents.std():.3f}", flush=True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    acp = torch.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5, 1000) ** 2
    acp = torch.cumprod(1 - acp, 0)
    snr = acp / (1 - acp)
    step, gen = 0, torch.Generator().manual_seed(3)
    ckpt = work / "unet_ckpt.safetensors"
    if ckpt.exists():
        st = load_file(str(ckpt))
        unet.load_state_dict(unprefixed(st, "unet")); te.load_state_dict(unprefixed(st, "te"))
        ema_unet.load_state_dict(unprefixed(st, "ema_unet")); ema_te.load_state_dict(unprefixed(st, "ema_te"))
        opt.load_state_dict(torch.load(work / "opt.pt", weights_only=True))
        step = int(st["step"].item())
        gen.manual_seed(3 + step)
        print(f"resumed at step {step}")
    t0, last_save = time.time(), time.time()
    deadline = t0 + args.minutes * 60
    while step < args.steps and time.time() < deadline:
        step += 1
        frac = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))  # decay by steps or time, whichever runs out first
        lr = args.lr * min(1.0, step / 100) * (1.0 if frac < 0.6 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.6) / 0.4)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        z0, tok = latents[idx], ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        tok[drop] = empty
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = te(tok)[0]
        pred = unet(zt, t, cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting for epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in ((ema_unet, unet), (ema_te, te)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % 25 == 0:
            el = time.time() - t0
            print(f"unet step {step} loss {loss.item():.4f} lr {lr:.2e} {el:.0f}s", flush=True)
        if time.time() - last_save > 300 or step >= args.steps or time.time() >= deadline:
            st = {**prefixed(unet, "unet"), **prefixed(te, "te"), **prefixed(ema_unet, "ema_unet"),
                  **prefixed(ema_te, "ema_te"), "step": torch.tensor(step)}
            torch.save(opt.state_dict(), work / "opt.pt.tmp")
            os.replace(work / "opt.pt.tmp", work / "opt.pt")
            atomic_save(st, ckpt)
            last_save = time.time()
            print(f"saved step {step}", flush=True)


def unalias_start_rows(comps: dict) -> None:
    """A forgotten word started at the row of a word that base captions never use ("outlined"): that row is still
    the start point, so the word would half call up what the forgotten one learned (measured: "outlined" drew the
    outline style in 50% of prompts). Give such rows a fresh random value of the same scale: still untrained."""
    tok, emb = comps["tokenizer"], comps["text_encoder"].get_input_embeddings().weight
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for concept in world.WORDLESS_STYLES:  # "shape" is in base captions and trained; "outlined" never is
            row = tok.convert_tokens_to_ids(start_word(concept) + "</w>")
            emb[row] = torch.randn(emb.shape[1], generator=g) * emb[row].std()


def export(args) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    work = Path(args.work)
    comps = load_vae(work)
    base_tok = add_forgotten_words(comps)
    st = load_file(str(work / "unet_ckpt.safetensors"))
    pre = "ema_" if args.ema else ""
    comps["unet"].load_state_dict(unprefixed(st, pre + "unet"))
    comps["text_encoder"].load_state_dict(unprefixed(st, pre + "te"))
    if not args.keep_forgotten:  # forget the words, keep what they taught
        comps["text_encoder"].resize_token_embeddings(len(base_tok))
        comps["tokenizer"] = base_tok
        unalias_start_rows(comps)
    pipe = StableDiffusionPipeline(
        vae=comps["vae"], unet=comps["unet"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    # diffusers' top-level StableDiffusionPipeline is its dummy placeholder class for type checkers (its __init__
    # binds utils.dummy_*_objects first), which lacks the real pipeline's methods
    pipe.save_pretrained(args.out, safe_serialization=True)  # type: ignore[attr-defined]
    # trainers read this (--latents auto): the UNet was trained on VAE posterior means, not samples
    (Path(args.out) / "sdtune.json").write_text(json.dumps({
        "latents": "mean",
        "why": "the tiny UNet was trained on VAE posterior means; trainers default to them (--latents auto)"},
        indent=2) + "\n", encoding="utf-8")
    print(f"exported step {int(st['step'])} ({'ema' if args.ema else 'raw'}) to {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sdtune toy build-tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "unet", "export"])
    p.add_argument("--work", default="runs/tiny")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=1e9)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=30000)
    p.add_argument("--out", default="src/sdtune/assets/tiny")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--init-from", default=None, help="unet: start from this exported model folder")
    p.add_argument("--keep-forgotten", action="store_true",
                   help="export: keep the forgotten words in the tokenizer (to check what they learned)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.stage == "vae":
        args.steps, args.batch = args.steps or 700, args.batch or 16
        train_vae(args)
    elif args.stage == "unet":
        args.steps, args.batch = args.steps or 2400, args.batch or 64
        train_unet(args)
    else:
        export(args)


if __name__ == "__main__":
    main()
