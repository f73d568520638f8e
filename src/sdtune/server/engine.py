"""The server's generation side: which model and VAE are loaded, the A1111 options, and txt2img on them.

Everything here runs on the job worker thread (`server.jobs`), so the loaded `Generator` is only ever used by one
thread. The Generator is the same one the CLI and the Python API use: the server adds no second code path. It
keeps one model loaded (switching loads the new one once); LoRA and hypernetwork tags are looked up in the
configured folders and embeddings come from the embeddings folder, hot-reloaded before every image.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.generate import GenerationParams, Generator
from sdtune.models.bundled import BUNDLED_MODEL
from sdtune.server.folders import ModelFolders
from sdtune.server.jobs import Job

AUTOMATIC_VAE = ("Automatic", "None", "")
PREVIEWS_PER_RUN = 5  # live previews decoded per image (A1111 decodes one every N steps)
PREVIEW_SIZE = 256


@dataclass
class Generation:
    """What one txt2img job made."""

    params: GenerationParams
    images: list[Any]
    model_name: str
    model_hash: str | None
    vae_name: str | None
    saved: list[Path]


def png_bytes(image: Any, infotext: str | None = None) -> bytes:
    from sdtune.generate.pnginfo import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    return buf.getvalue()


def b64_png(image: Any, infotext: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


class GenerationService:
    """Models, options and txt2img for the server (see the module docstring)."""

    def __init__(self, folders: ModelFolders, *, device: str | None = None, dtype: str | None = None) -> None:
        self.folders = folders
        self.device, self.dtype = device, dtype
        self.options: dict[str, Any] = {"sd_model_checkpoint": BUNDLED_MODEL, "sd_vae": "Automatic",
                                        "CLIP_stop_at_last_layers": 1, "samples_format": "png"}
        self._generator: Generator | None = None
        self._key: tuple[str, str] | None = None

    # -- models ---------------------------------------------------------------------------------------------

    def resolve_checkpoint(self, name: str) -> tuple[str, str]:
        """(display name, load spec) of a checkpoint named as A1111 names it."""
        found = self.folders.find("ckpt", name)
        return found.name, (BUNDLED_MODEL if found.name == BUNDLED_MODEL else str(found.path))

    def resolve_vae(self, name: str | None) -> str | None:
        if name is None or name in AUTOMATIC_VAE:
            return None
        return str(self.folders.find("vae", name).path)

    def generator(self, checkpoint: str | None = None, vae: str | None = None) -> Generator:
        """The loaded Generator for this checkpoint and VAE (loading them if they are not the current ones)."""
        name, spec = self.resolve_checkpoint(checkpoint or self.options["sd_model_checkpoint"])
        vae_name = vae if vae is not None else self.options["sd_vae"]
        vae_path = self.resolve_vae(vae_name)
        key = (spec, vae_path or "")
        if self._generator is None or self._key != key:
            self._generator = None  # free the old model before loading the new one
            gen = Generator(spec, vae=vae_path, device=self.device, dtype=self.dtype,
                            lora_dirs=[self.folders.lora] if self.folders.lora else None)
            if self.folders.hypernetwork is not None:
                gen.set_hypernetworks([], dirs=[self.folders.hypernetwork])
            if self.folders.embeddings is not None:
                gen.embeddings.add_source(self.folders.embeddings)
            self._generator, self._key = gen, key
        return self._generator

    @property
    def loaded(self) -> Generator | None:
        return self._generator

    @property
    def loaded_spec(self) -> str | None:
        """The load spec (path, or `tiny`) of the loaded checkpoint."""
        return self._key[0] if self._key is not None else None

    # -- txt2img --------------------------------------------------------------------------------------------

    def txt2img(self, params: GenerationParams, job: Job, *, checkpoint: str | None = None, vae: str | None = None,
                save: bool = False) -> Generation:
        gen = self.generator(checkpoint, vae)
        params = gen.prepare(params)
        job.progress.total = params.steps * params.batch_count
        job.progress.preview_decoder = lambda source: _preview_png(*source)
        job.title = params.prompt[:80]
        job.progress.batches = params.batch_count
        every = max(1, params.steps // PREVIEWS_PER_RUN)
        count = {"step": 0}

        def progress(done: int, total: int) -> None:
            job.progress.step, job.progress.total = done, total
            job.progress.text = f"step {done} of {total}"

        def preview(pipe: Any, latents: Any) -> None:
            count["step"] += 1
            if count["step"] % every == 0:
                job.progress.preview_source = (pipe, latents[:1].detach().clone())

        started = time.time()
        images = gen.generate(params, progress=progress, control=job.control, preview=preview)
        saved: list[Path] = []
        if save:
            from sdtune.generate.output import save_image

            folder = self.folders.outputs / "txt2img-images" / time.strftime("%Y-%m-%d", time.localtime(started))
            saved = [save_image(im.image, folder, im.seed, im.infotext) for im in images]
        model = gen.model
        vae_name = None if (vae or self.options["sd_vae"]) in AUTOMATIC_VAE else (vae or self.options["sd_vae"])
        return Generation(params=params, images=images, model_name=model.name, model_hash=model.hash,
                          vae_name=vae_name, saved=saved)


def _preview_png(pipe: Any, latents: Any) -> bytes | None:
    """The first image of the batch decoded by the VAE at this step, small (a preview is never worth an error)."""
    import torch

    try:
        with torch.no_grad():
            vae = pipe.vae
            lat = latents[:1].to(vae.dtype) / vae.config.scaling_factor
            decoded = vae.decode(lat).sample
        image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
        image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
        return png_bytes(image)
    except Exception:  # noqa: BLE001
        return None

