"""GPU benchmark: sdtune's training loop and generation against baselines written the way the diffusers example
scripts work, on SD1.5- and SDXL-architecture models with random weights built from the shipped configs
(`src/sdtune/models/configs`) directly on the GPU. Nothing is downloaded; speed does not depend on the weights.

    python bench/gpu.py [--json gpu-bench.json] [--peak-tflops 989]     # one H100: under 8 minutes
    python bench/gpu.py --smoke                                         # the same code, CPU, tiny shapes (a test)

Cases (the full run; --smoke uses the tiny test models at 32 px, batch 2, a few steps):
  lora-sd15        LoRA rank 16 (attention), SD1.5 512 px, batch 8, bf16
  lora-sdxl        LoRA rank 16 (attention), SDXL 1024 px, batch 1, bf16, gradient checkpointing
  ti-sd15          textual inversion (1 token, 2 vectors), SD1.5 512 px, batch 8, bf16
  dreambooth-sd15  full UNet fine-tuning, SD1.5 512 px, batch 1, bf16, gradient checkpointing, no prior
  generate-sd15    txt2img 512 px, 20 Euler steps, CFG 7, batch 1: sdtune's Generator vs a bare diffusers pipeline

"sdtune" is `sdtune.training.Trainer` (latents encoded once before training). "baseline" is what
diffusers' train_text_to_image_lora.py / textual_inversion.py / train_dreambooth.py do per step: the VAE encodes the
images and the text encoder the captions every step; textual inversion trains the whole token-embedding matrix
(AdamW over every row, the other rows restored after each step). steps/s counts the steps after `--warmup`;
peak memory is `torch.cuda.max_memory_allocated` of that variant (reset before it). MFU = (FLOPs of one training
step's UNet forward + backward as trained, counted once by `torch.utils.flop_counter.FlopCounterMode` at the case's
shapes) x steps/s / the GPU's dense bf16 peak; the same useful FLOPs for both variants, so the baseline's extra VAE
and text-encoder work counts as overhead. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; --peak-tflops overrides.
PEAKS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass
class Case:
    name: str
    family: str            # sd1 | sdxl
    kind: str              # lora | ti | dreambooth | generate
    resolution: int
    batch: int
    steps: int
    checkpointing: bool = False


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case("lora-sd15", "sd1", "lora", 32, 2, 3), Case("lora-sdxl", "sdxl", "lora", 32, 1, 3, True),
                Case("ti-sd15", "sd1", "ti", 32, 2, 3), Case("dreambooth-sd15", "sd1", "dreambooth", 32, 1, 3, True),
                Case("generate-sd15", "sd1", "generate", 32, 1, 2)]
    return [Case("lora-sd15", "sd1", "lora", 512, 8, 30), Case("lora-sdxl", "sdxl", "lora", 1024, 1, 20, True),
            Case("ti-sd15", "sd1", "ti", 512, 8, 30), Case("dreambooth-sd15", "sd1", "dreambooth", 512, 1, 20, True),
            Case("generate-sd15", "sd1", "generate", 512, 1, 4)]


# ================================================================================================== models

def build_model(family: str, smoke: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A LoadedModel of `family` with random weights: the tiny test architecture (--smoke) or the shipped full
    configs, initialised directly on `device` (no CPU copy of SDXL's 2.6B UNet parameters)."""
    from sdtune.models.loading import LoadedModel

    if smoke:
        from sdtune.models.testing import tiny_pipeline

        pipe = tiny_pipeline(family, 0)
    else:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from sdtune.models.infer import configs_dir
        from sdtune.models.single_file import build_pipeline
        from sdtune.models.tokenizer import clip_tokenizer

        cfg = configs_dir(family)
        torch.manual_seed(0)
        with device:
            c: dict[str, Any] = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
                                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")),
                                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))}
            if family == "sdxl":
                c["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))
                c["tokenizer_2"] = clip_tokenizer("!")
        c["tokenizer"] = clip_tokenizer()
        c["scheduler"] = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(cfg / "scheduler"))
        pipe = build_pipeline(family, c)
    if device.type != "cpu" or dtype != torch.float32:
        from sdtune.models.loading import quiet_loading

        with quiet_loading():
            pipe.to(device, dtype)
    return LoadedModel(pipe=pipe, family=family, prediction_type="epsilon", name=f"{family}-random",
                       hash="0" * 10, source=Path(f"<{family}-random>"), device=device, dtype=dtype)


def free() -> None:
    """Release the last variant's GPU memory and reset the peak (on the CPU nothing to do: gc.collect over the
    models' object graphs would only slow the smoke test)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(stamps: list[float], warmup: int) -> float:
    """Steps per second over the steps after the first `warmup` (timestamps taken after each step)."""
    use = stamps[warmup - 1:] if warmup > 0 else stamps
    return (len(use) - 1) / (use[-1] - use[0])


# ============================================================================================== sdtune side

def ours_train(case: Case, model: Any, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from sdtune.training import TrainConfig, Trainer
    from sdtune.training.methods.dreambooth import DreamBoothOptions
    from sdtune.training.methods.lora import LoraOptions
    from sdtune.training.methods.textual_inversion import TIOptions

    options: Any = {"lora": lambda: LoraOptions(rank=16), "ti": lambda: TIOptions(token="<bench>", vectors=2),
                    "dreambooth": lambda: DreamBoothOptions(prior_preservation=False, diffusers_folder=False)}[
        case.kind]()
    cfg = TrainConfig(method=case.kind, data=str(data), out=str(Path(tempfile.mkdtemp(dir=work))), steps=case.steps,
                      lr=1e-5 if case.kind == "dreambooth" else 1e-4, batch_size=case.batch, save_every=0,
                      progress=False, tensorboard=False, resolution=case.resolution, options=options,
                      mixed_precision=args.precision, gradient_checkpointing=case.checkpointing,
                      device=str(model.device))
    stamps: list[float] = []
    device = model.device

    def on_step(trainer: Any, step: int, loss: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    free()
    Trainer(cfg, model=model, on_step=on_step, echo=lambda s: None).run()
    return {"steps_per_s": rate(stamps, args.warmup), "peak_gb": peak_gb(device)}


# ============================================================================================ the baselines

def _pixels(data: Path, resolution: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    from sdtune.training.images import fit_image, to_tensor

    files = sorted(data.glob("*.png"))
    x = torch.stack([to_tensor(fit_image(Image.open(f).convert("RGB"), (resolution, resolution))) for f in files])
    return x.to(device), [f.with_suffix(".txt").read_text().strip() for f in files]


def _encode_text(pipe: Any, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, SDXL pooled) the way the diffusers examples encode captions (penultimate layers for SDXL)."""
    def ids(tok: Any) -> torch.Tensor:
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(ids(pipe.tokenizer))[0], None
    out1 = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
    out2 = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
    return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2[0]


def baseline_train(case: Case, model: Any, data: Path, args: argparse.Namespace,
                   flops: Callable[[Callable[[], None]], None]) -> dict[str, Any]:
    """One variant of diffusers' example training loops (see the module docstring). `flops(fn)` counts fn's FLOPs
    (called once, on the first step's UNet forward and backward, which is not timed)."""
    import torch.nn.functional as F

    pipe, device = model.pipe, model.device
    unet, vae = pipe.unet, pipe.vae
    tes = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for m in (unet, vae, *tes):
        m.requires_grad_(False)
    if case.checkpointing:
        unet.enable_gradient_checkpointing()
    token_rows: torch.Tensor | None = None
    if case.kind == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    elif case.kind == "ti":
        tok = pipe.tokenizer
        tok.add_tokens(["<b0>", "<b1>"])
        tes[0].resize_token_embeddings(len(tok), mean_resizing=False)
        tes[0].float()
        emb = tes[0].get_input_embeddings().weight
        emb.requires_grad_(True)
        params = [emb]
        keep = torch.ones(len(tok), dtype=torch.bool, device=device)
        keep[tok.convert_tokens_to_ids(["<b0>", "<b1>"])] = False
        token_rows = emb.detach().clone()
    else:
        unet.float().requires_grad_(True)
        params = list(unet.parameters())
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    x_all, captions = _pixels(data, case.resolution, device)
    if case.kind == "ti":
        captions = ["a photo of <b0><b1>"] * len(captions)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the examples' noise scheduler
    n_t = int(sched.config.num_train_timesteps)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    stamps: list[float] = []
    free()
    for step in range(case.steps):
        idx = torch.randint(0, len(x_all), (case.batch,), generator=gen).tolist()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = vae.encode(x_all[idx].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            with torch.set_grad_enabled(case.kind == "ti"):
                hidden, pooled = _encode_text(pipe, [captions[i] for i in idx], device)
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            t = torch.randint(0, n_t, (case.batch,), generator=gen).to(device)
            noisy = sched.add_noise(latents, noise, t)
            kw: dict[str, Any] = {}
            if pooled is not None:
                r = float(case.resolution)
                kw["added_cond_kwargs"] = {"text_embeds": pooled,
                                           "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * case.batch, device=device)}

            def fwd_bwd(noisy: torch.Tensor = noisy, t: torch.Tensor = t, hidden: torch.Tensor = hidden,
                        kw: dict[str, Any] = kw, noise: torch.Tensor = noise) -> None:
                pred = unet(noisy, t, encoder_hidden_states=hidden, **kw).sample
                F.mse_loss(pred.float(), noise.float()).backward()

            if step == 0:
                flops(fwd_bwd)
            else:
                fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if token_rows is not None:
            with torch.no_grad():
                params[0][keep] = token_rows[keep]
        sync(device)
        stamps.append(time.perf_counter())
    return {"steps_per_s": rate(stamps, args.warmup), "peak_gb": peak_gb(device)}


# ============================================================================================== generation

def generation(case: Case, model: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler

    from sdtune.generate import GenerationParams, Generator

    device, steps = model.device, 2 if args.smoke else 20
    prompt = "a red circle on a white background"
    out: dict[str, dict[str, Any]] = {}
    gen = Generator(model=model)
    params = GenerationParams(prompt=prompt, steps=steps, cfg_scale=7.0, sampler="Euler", width=case.resolution,
                              height=case.resolution)

    def timed(fn: Callable[[int], Any]) -> dict[str, Any]:
        fn(0)  # warm-up
        free()
        times = []
        for i in range(case.steps):
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"s_per_image": times[len(times) // 2], "peak_gb": peak_gb(device)}

    out["sdtune"] = timed(lambda i: gen.generate(params.replace(seed=i)))
    pipe = model.pipe
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out["baseline"] = timed(lambda i: pipe(prompt, num_inference_steps=steps, guidance_scale=7.0,
                                           height=case.resolution, width=case.resolution,
                                           generator=torch.Generator("cpu").manual_seed(i)))
    return out


# ==================================================================================================== run

def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


@contextlib.contextmanager
def _data(work: Path, n: int, size: int) -> Iterator[Path]:
    from sdtune.toy.testing import write_toy_dataset

    folder = work / f"data-{n}-{size}"
    if not folder.exists():
        write_toy_dataset(folder, n, size=size)
    yield folder


def run_case(case: Case, args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    row: dict[str, Any] = {"case": case.name, "resolution": case.resolution, "batch": case.batch,
                           "steps": case.steps, "checkpointing": case.checkpointing}
    if case.kind == "generate":
        model = build_model(case.family, args.smoke, device, dtype)
        row.update({f"{k}_{m}": v for k, r in generation(case, model, args).items() for m, v in r.items()})
        del model
        free()
        return row
    n_images = max(8, case.batch * 2)
    with _data(work, n_images, min(case.resolution, 256)) as data:
        counted: dict[str, float] = {}

        def count(fn: Callable[[], None]) -> None:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                fn()
            counted["flops"] = float(fc.get_total_flops())

        model = build_model(case.family, args.smoke, device, dtype)
        base = baseline_train(case, model, data, args, count)
        del model
        free()
        model = build_model(case.family, args.smoke, device, dtype)
        ours = ours_train(case, model, data, work, args)
        del model
        free()
    peak = peak_flops(device, args.peak_tflops)
    row["unet_flops_per_step"] = counted.get("flops")
    for name, r in (("baseline", base), ("sdtune", ours)):
        row[f"{name}_steps_per_s"] = r["steps_per_s"]
        row[f"{name}_peak_gb"] = r["peak_gb"]
        row[f"{name}_mfu"] = counted["flops"] * r["steps_per_s"] / peak if peak and counted.get("flops") else None
    row["speedup"] = ours["steps_per_s"] / base["steps_per_s"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'case':<16} {'variant':<9} {'steps/s':>8} {'s/image':>8} {'peak GB':>8} {'MFU':>6}"]
    for r in rows:
        for v in ("baseline", "sdtune"):
            lines.append(f"{r['case']:<16} {v:<9} {f(r.get(f'{v}_steps_per_s'), '.3f'):>8} "
                         f"{f(r.get(f'{v}_s_per_image'), '.3f'):>8} {f(r.get(f'{v}_peak_gb'), '.2f'):>8} "
                         f"{f(r.get(f'{v}_mfu'), '.1%'):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU with tiny shapes (a test)")
    ap.add_argument("--json", default="gpu-bench.json", help="where to write the results")
    ap.add_argument("--precision", choices=("bf16", "no"), default=None, help="default: bf16 (no with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="steps not timed (default 3; 1 with --smoke)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU")
    ap.add_argument("--only", action="append", default=None, help="run only these cases (repeatable)")
    args = ap.parse_args(argv)
    args.precision = args.precision or ("no" if args.smoke else "bf16")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke for the CPU check)")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "precision": args.precision,
            "smoke": args.smoke, "peak_flops": peak_flops(device, args.peak_tflops)}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdtune-gpu-bench-") as tmp:
        for case in cases(args.smoke):
            if args.only and case.name not in args.only:
                continue
            t = time.perf_counter()
            rows.append(run_case(case, args, device, Path(tmp)))
            print(f"{case.name}: {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    result = {"info": {**info, "seconds": time.perf_counter() - t0}, "rows": rows}
    print(table(rows))
    from sdtune.atomic import write_atomic

    write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
