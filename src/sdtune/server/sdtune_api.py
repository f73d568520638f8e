"""sdtune's own API under `/sdtune/v1/`: training runs (start from a TrainConfig JSON, list, inspect, stop, resume),
the config schema the Train page builds its form from, datasets (thumbnails, captions, check), and what the
Generate page needs beyond A1111's API (token counts, extra-network cards, saved images, the job queue)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sdtune.errors import NotFound, SdtuneError
from sdtune.server.folders import confine
from sdtune.server.runs import (
    METHOD_GUIDANCE,
    PRESETS,
    build_config,
    check_run_name,
    confined_data,
    ended_status,
    list_runs,
    read_run,
    sectioned,
    use_checkpoint,
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_DATASET_LISTING = 500
MAX_CAPTION = 10_000


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    # 1: the server's worker thread; N >= 2: `torchrun --nproc_per_node N` (server.launch; docs/multi_gpu.md)
    processes: int = 1


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    processes: int | None = None  # default: as many as the saved state was trained with


class WrongLoraRequest(BaseModel):
    """`sdtune recipe wrong-lora`'s settings (`recipes.wrong_lora.WrongLoraSettings`' field names; `train` holds
    the LoRA run's overrides: steps, lr, rank, alpha, batch_size, text_encoder, ...)."""
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str | None = None  # a checkpoint name as Generate names it; default: the loaded one
    settings: dict[str, Any] = Field(default_factory=dict)


class ConfigRequest(BaseModel):
    method: str
    config: dict[str, Any] = Field(default_factory=dict)


class TomlRequest(BaseModel):
    toml: str = Field(..., max_length=200_000)


class CaptionRequest(BaseModel):
    path: str
    caption: str = Field(..., max_length=MAX_CAPTION)


class DatasetRequest(BaseModel):
    path: str
    method: str | None = None


def _field_schema(f: Any) -> dict[str, Any]:
    import dataclasses

    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    meta = f.metadata
    return {"name": f.name, "section": meta.get("section"), "kind": meta.get("kind"), "help": meta.get("help"),
            "default": default, "choices": list(meta["choices"]) if meta.get("choices") else None}


def config_schema() -> dict[str, Any]:
    """TrainConfig's fields and every method's options, from their own metadata: a new option appears in the UI
    with no UI change."""
    import dataclasses

    from sdtune.training.config import TrainConfig
    from sdtune.training.methods import METHODS

    methods = {}
    for name, cls in sorted(METHODS.items()):
        if not getattr(cls, "public", True):
            continue
        methods[name] = {"summary": cls.summary, "guidance": METHOD_GUIDANCE.get(name, cls.summary),
                         "presets": PRESETS.get(name, []),
                         "options": [_field_schema(f) for f in dataclasses.fields(cls.Options)
                                     if f.metadata.get("cli", True)]}
    from sdtune.server.launch import CPU_MAX_PROCESSES, cuda_devices, max_processes

    gpus = cuda_devices()
    processes = {"default": 1, "max": max_processes(), "gpus": gpus,
                 "help": ("Processes to train on: 1 runs in the server; N >= 2 launches torchrun with N processes ("
                          + (f"one per GPU, {gpus} visible" if gpus else f"CPU only: gloo, at most {CPU_MAX_PROCESSES}")
                          + "). --batch-size is per process: the global batch is batch_size x processes.")}
    return {"fields": [_field_schema(f) for f in TrainConfig.fields() if f.metadata.get("cli", True)],
            "methods": methods, "processes": processes}


def sdtune_router(state: Any) -> APIRouter:
    api = APIRouter(prefix="/sdtune/v1", tags=["sdtune API"])
    folders, jobs, engine, registry = state.folders, state.jobs, state.engine, state.runs

    # -- training ---------------------------------------------------------------------------------------------

    @api.get("/schema")
    def schema() -> dict[str, Any]:
        return config_schema()

    @api.post("/runs")
    def start_run(req: TrainRequest) -> dict[str, Any]:
        cfg = build_config(folders, engine, req.method, req.name, req.config)
        job = registry.start(cfg, processes=req.processes)
        return {"run": req.name, "job": job.describe()}

    @api.get("/runs")
    def runs() -> list[dict[str, Any]]:
        out = registry.with_started(list_runs(folders.runs))
        for r in out:
            r["status"] = registry.status(r["name"]) or ended_status(folders.runs / r["name"], r.get("final"))
        return out

    @api.get("/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        job = registry.job_of.get(name)
        doc = read_run(confine(folders.runs, check_run_name(name)), started=job is not None)
        doc["method"] = (doc.get("config") or {}).get("method") or registry.method_of.get(name)
        doc["status"] = job.status if job is not None else \
            ended_status(folders.runs / name, (doc.get("summary") or {}).get("final"))
        doc["job"] = job.describe() if job is not None else None
        doc["message"] = "" if job is None else (f"error: {job.error}" if job.status == "failed" else job.progress.text)
        return doc

    @api.get("/runs/{name}/file")
    def run_file(name: str, path: str) -> FileResponse:
        folder = confine(folders.runs, check_run_name(name))
        target = confine(folder, path)
        if not target.is_file():
            raise NotFound(f"{path}: no such file in run {name}")
        return FileResponse(target)

    @api.post("/runs/{name}/stop")
    def stop(name: str) -> dict[str, Any]:
        registry.stop(check_run_name(name))
        return {}

    @api.post("/runs/{name}/resume")
    def resume(name: str, req: ResumeRequest | None = None) -> dict[str, Any]:
        from sdtune.server.launch import recorded_processes
        from sdtune.training.config import TrainConfig

        folder = confine(folders.runs, check_run_name(name))
        if not (folder / "config.toml").is_file():
            raise SdtuneError(f"run {name!r} has no config.toml to resume from")
        cfg = TrainConfig.from_toml(folder / "config.toml").replace(out=str(folder), progress=False)
        processes = req.processes if req is not None and req.processes is not None else recorded_processes(folder)
        job = registry.start(cfg, resume=True, processes=processes)
        return {"run": name, "job": job.describe()}

    @api.post("/runs/{name}/use")
    def use(name: str, step: int) -> dict[str, Any]:
        return use_checkpoint(folders, name, step)

    # -- recipes ----------------------------------------------------------------------------------------------

    @api.post("/recipes/wrong-lora")
    def start_wrong_lora(req: WrongLoraRequest) -> dict[str, Any]:
        from sdtune.server.recipes import wrong_lora_settings

        settings, evaluate = wrong_lora_settings(folders, engine, req.name, req.model, req.settings,
                                                 state.settings.recipe_defaults)
        job = state.recipes.start(settings, evaluate)
        return {"recipe": req.name, "job": job.describe()}

    @api.get("/recipes/wrong-lora/{name}")
    def wrong_lora(name: str) -> dict[str, Any]:
        return state.recipes.read(folders.runs, name)

    @api.post("/recipes/wrong-lora/{name}/stop")
    def stop_wrong_lora(name: str) -> dict[str, Any]:
        state.recipes.stop(check_run_name(name))
        return {}

    @api.post("/config/toml")
    def to_toml(req: ConfigRequest) -> dict[str, Any]:
        from sdtune.training.config import TrainConfig

        cfg = TrainConfig.from_dict(sectioned(req.method, req.config), source="request",
                                    base=TrainConfig(method=req.method))
        return {"toml": cfg.to_toml()}

    @api.post("/config/parse")
    def parse_toml(req: TomlRequest) -> dict[str, Any]:
        import tomllib

        from sdtune.training.config import TrainConfig

        try:
            data = tomllib.loads(req.toml)
        except tomllib.TOMLDecodeError as exc:
            raise SdtuneError(f"not valid TOML: {exc}") from None
        cfg = TrainConfig.from_dict(data, source="TOML")
        return {"method": cfg.method, "config": cfg.to_dict()}

    # -- datasets ---------------------------------------------------------------------------------------------

    @api.get("/datasets")
    def dataset(path: str) -> dict[str, Any]:
        folder = confined_data(folders, path)
        if not folder.is_dir():
            raise SdtuneError(f"{path}: no such folder")
        items = []
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith("."):
                cap = p.with_suffix(".txt")
                items.append({"image": str(p.relative_to(folder)),
                              "caption": cap.read_text(encoding="utf-8", errors="replace") if cap.is_file() else None})
                if len(items) >= MAX_DATASET_LISTING:
                    break
        return {"folder": str(folder), "items": items}

    @api.get("/datasets/image")
    def dataset_image(path: str, image: str) -> Response:
        from PIL import Image

        from sdtune.server.engine import png_bytes

        target = confine(confined_data(folders, path), image)
        if target.suffix.lower() not in IMAGE_EXTS or not target.is_file():
            raise SdtuneError(f"{image}: not an image of the dataset")
        with Image.open(target) as opened:
            thumb = opened.convert("RGB")
        thumb.thumbnail((192, 192))
        return Response(png_bytes(thumb), media_type="image/png")

    @api.put("/datasets/caption")
    def caption(req: CaptionRequest, path: str) -> dict[str, Any]:
        from sdtune.atomic import write_atomic

        target = confine(confined_data(folders, path), req.path)
        if target.suffix.lower() not in IMAGE_EXTS or not target.is_file():
            raise SdtuneError(f"{req.path}: not an image of the dataset")
        write_atomic(target.with_suffix(".txt"), req.caption)
        return {"image": req.path, "caption": req.caption}

    @api.post("/datasets/check")
    async def check(req: DatasetRequest) -> dict[str, Any]:
        from sdtune.training.dataset_check import check_dataset

        folder = confined_data(folders, req.path)
        report = await asyncio.to_thread(check_dataset, folder, method=req.method)
        return {"report": report.to_dict(), "text": report.format()}

    # -- generation helpers -----------------------------------------------------------------------------------

    @api.get("/tokens")
    def tokens(prompt: str = "") -> dict[str, Any]:
        return {"chunks": state.token_counts(prompt)}

    @api.get("/extra-networks")
    async def extra_networks() -> dict[str, Any]:
        cards = await asyncio.to_thread(state.file_cards)  # file headers only: generation is not held up
        cards["embedding"] = await jobs.run("embeddings", "list embeddings", lambda job: state.embedding_cards())
        return cards

    @api.get("/preview")
    def preview(kind: str, name: str) -> FileResponse:
        if kind not in ("lora", "hypernetwork", "ckpt", "vae"):
            raise SdtuneError(f"kind {kind!r}: use lora, hypernetwork, ckpt or vae")
        found = folders.find(kind, name)
        if found.preview is None:
            raise SdtuneError(f"{name} has no preview image")
        return FileResponse(found.preview)

    @api.get("/outputs")
    def output_file(path: str) -> FileResponse:
        target = confine(folders.outputs, path)
        if target.suffix.lower() != ".png" or not target.is_file():
            raise SdtuneError(f"{path}: no such image in the outputs folder")
        return FileResponse(target)

    @api.get("/jobs")
    def queue() -> dict[str, Any]:
        return jobs.snapshot()

    return api
