"""A1111's `/sdapi/v1` endpoints: the same paths, JSON field names and meanings as AUTOMATIC1111 1.x, so scripts,
bots and client libraries written for A1111 drive sdtune unchanged. Every generation goes through the job queue
and the `GenerationService` (the same Generator as the CLI)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from sdtune.errors import SdtuneError
from sdtune.server.a1111_models import (
    PIXEL_OPTIONS,
    OptionsUpdate,
    PngInfoRequest,
    Txt2ImgRequest,
    check_pixel_options,
    to_params,
)
from sdtune.server.engine import Generation, b64_png
from sdtune.server.jobs import Job
from sdtune.version import __version__


def _info(gen: Generation, req: Txt2ImgRequest) -> dict[str, Any]:
    """The `info` JSON A1111 returns beside the images (field names as A1111 fills them)."""
    p = gen.params
    images = gen.images
    first = images[0] if images else None
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * len(images),
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * len(images),
        "seed": p.seed, "all_seeds": [im.seed for im in images],
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
        "width": p.width, "height": p.height, "sampler_name": p.sampler, "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": gen.model_name, "sd_model_hash": gen.model_hash, "sd_vae_name": gen.vae_name,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": None, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [im.infotext for im in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": False, "version": f"sdtune {__version__}",
        "saved_files": [str(path) for path in gen.saved],
        "infotext": first.infotext if first is not None else "",
    }


def decode_image_b64(text: str) -> bytes:
    """A1111 accepts plain base64 or a data: URL."""
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise SdtuneError("image is not valid base64; send the PNG file's bytes base64-encoded") from None


def _lora_metadata(path: Path) -> dict[str, Any]:
    """A .safetensors file's metadata as A1111's /loras gives it (values that hold JSON objects parsed); other
    files and unreadable headers: {}."""
    from sdtune.formats.safe_io import read_safetensors_metadata

    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        meta: dict[str, Any] = dict(read_safetensors_metadata(path))
    except (SdtuneError, OSError, ValueError):
        return {}
    for key, value in meta.items():
        if isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(ValueError):
                meta[key] = json.loads(value)
    return meta


def a1111_router(state: Any) -> APIRouter:
    """The routes, bound to a running server's state (`server.app.ServerState`)."""
    api = APIRouter(prefix="/sdapi/v1", tags=["A1111 API"])
    engine, jobs, folders = state.engine, state.jobs, state.folders

    @api.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        override = dict(req.override_settings or {})
        check_pixel_options(override, "override_settings")
        clip_skip = int(override.get("CLIP_stop_at_last_layers", engine.options["CLIP_stop_at_last_layers"]))
        params = to_params(req, clip_skip)  # a bad request is refused before it waits in the queue
        checkpoint = override.get("sd_model_checkpoint")
        vae = override.get("sd_vae")
        if checkpoint is not None:
            engine.resolve_checkpoint(str(checkpoint))
        if vae is not None:
            engine.resolve_vae(str(vae))
        if params.refiner:  # A1111 names the refiner like any checkpoint: the file in the checkpoint folder
            params = params.replace(refiner=engine.resolve_checkpoint(params.refiner)[1])

        def work(job: Job) -> Generation:
            result = engine.txt2img(params, job, checkpoint=checkpoint, vae=vae, save=req.save_images)
            if not req.override_settings_restore_afterwards:
                for key in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"):
                    if key in override:
                        engine.options[key] = override[key]
            return result

        job = jobs.submit(Job(kind="txt2img", title=params.prompt[:80], run=work))
        gen: Generation = await asyncio.wrap_future(job.future)
        images = [b64_png(im.image, im.infotext) for im in gen.images] if req.send_images else []
        return {"images": images, "parameters": req.model_dump(), "info": json.dumps(_info(gen, req))}

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = jobs.current
        queued = sum(1 for j in jobs.jobs.values() if j.status == "queued")
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "current_task": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "queued": queued,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        pr = job.progress
        image = None
        png = None if skip_current_image else pr.preview_png()
        if png is not None:
            image = base64.b64encode(png).decode("ascii")
        # A1111 counts a request's batches (n_iter) as jobs and steps within the current one
        batches = max(1, pr.batches)
        per_batch = max(1, pr.total // batches)
        job_no = min(pr.step // per_batch, batches - 1)
        return {"progress": round(pr.fraction, 4), "eta_relative": round(pr.eta, 2), "current_image": image,
                "textinfo": pr.text or None, "current_task": job.id,
                "state": {"skipped": job.control.skipped, "interrupted": job.control.interrupted, "job": job.title,
                          "job_count": batches, "job_timestamp": time.strftime(
                              "%Y%m%d%H%M%S", time.localtime(pr.started or job.created)),
                          "job_no": job_no, "sampling_step": pr.step - job_no * per_batch,
                          "sampling_steps": per_batch if pr.total else 0, "queued": queued}}

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        jobs.interrupt_all()
        return {}

    @api.post("/skip")
    def skip() -> dict[str, Any]:
        jobs.skip()
        return {}

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        from sdtune.generate.samplers import get_sampler, sampler_names, usable

        found = [get_sampler(n) for n in sampler_names()]  # only those that run here (LMS needs scipy)
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in found if usable(s)]

    @api.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model":
                 False}, {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                          "need_inner_model": False}]

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        loaded, spec = engine.loaded, engine.loaded_spec
        out = []
        for f in folders.checkpoints():
            this = "tiny" if f.name == "tiny" else str(f.path)
            h = loaded.model.hash if loaded is not None and spec == this else None
            title = (f.name if f.name == "tiny" else f.path.name) + (f" [{h}]" if h else "")
            out.append({"title": title, "model_name": f.name, "hash": h, "sha256": None,
                        "filename": str(f.path), "config": None})
        return out

    @api.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": f.path.name, "filename": str(f.path)} for f in folders.vaes()]

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": f.path.stem, "alias": f.path.stem, "path": str(f.path), "metadata": _lora_metadata(f.path)}
                for f in folders.loras()]

    @api.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return [{"name": f.path.stem, "path": str(f.path)} for f in folders.hypernetworks()]

    @api.get("/embeddings")
    async def embeddings() -> dict[str, Any]:
        return await jobs.run("embeddings", "list embeddings", lambda job: state.embedding_listing())

    @api.get("/prompt-styles")
    @api.get("/upscalers")
    @api.get("/latent-upscale-modes")
    @api.get("/face-restorers")
    @api.get("/extensions")
    def none_here() -> list[Any]:
        return []  # clients list these at start-up; sdtune has none (hires fix, styles, ... are refused in txt2img)

    @api.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        return {}  # listings are read from disk on every request

    @api.post("/refresh-loras")
    def refresh_loras() -> dict[str, Any]:
        return {}

    @api.post("/refresh-embeddings")
    def refresh_embeddings() -> dict[str, Any]:
        return {}  # the embedding library re-scans its folder before every image

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        return {**{key: accepted[0] for key, accepted in PIXEL_OPTIONS.items()}, **engine.options}

    @api.post("/options")
    async def set_options(update: OptionsUpdate) -> dict[str, Any]:
        values = update.model_dump()
        check_pixel_options(values, "options")
        if "sd_model_checkpoint" in values:
            values["sd_model_checkpoint"] = engine.resolve_checkpoint(str(values["sd_model_checkpoint"]))[0]
        if "sd_vae" in values:
            engine.resolve_vae(str(values["sd_vae"]))
        if "CLIP_stop_at_last_layers" in values:
            skip = values["CLIP_stop_at_last_layers"]
            if isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= 12:
                raise SdtuneError("CLIP_stop_at_last_layers must be a whole number from 1 to 12")

        def work(job: Job) -> None:
            engine.options.update(values)
            engine.generator()  # load the chosen model now, as A1111 does

        await jobs.run("options", "load model", work)
        return {}

    @api.post("/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        from sdtune.generate.pnginfo import PNG_KEY, parse_infotext

        data = decode_image_b64(req.image)
        try:
            image = Image.open(io.BytesIO(data))
            items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        except (UnidentifiedImageError, OSError):
            raise SdtuneError("image is not a readable PNG/JPEG/WebP file") from None
        text = items.get(PNG_KEY, "")
        parsed = parse_infotext(text) if text else None
        parameters: dict[str, Any] = {}
        if parsed is not None:
            for key, value in {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt,
                               **parsed.fields}.items():
                size = re.fullmatch(r"(\d+)x(\d+)", str(value))
                if size:  # A1111 splits "Size: 512x768" (and "Hires resize") into "Size-1" / "Size-2"
                    parameters[f"{key}-1"], parameters[f"{key}-2"] = size.group(1), size.group(2)
                else:
                    parameters[key] = value
        return {"info": text, "items": items, "parameters": parameters}

    return api
