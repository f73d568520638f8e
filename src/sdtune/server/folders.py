"""The model folders the server works on, A1111's layout, and the rule that request paths stay inside them.

`ModelFolders.from_options(data_dir=..., ckpt_dir=..., ...)`: `--data-dir` pointed at an A1111 install finds
`models/Stable-diffusion`, `models/VAE`, `models/Lora`, `models/hypernetworks` and `embeddings`; each folder can
also be given on its own. Listings are recomputed on every call (`refresh-*` endpoints are then free), so files
added, changed or removed on disk show up without a restart.

`confine(root, relative)` is the one check for a path that comes from a request: relative to a configured folder,
no `..`, no absolute path elsewhere, no symlink that leads out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sdtune.errors import SdtuneError
from sdtune.models.bundled import BUNDLED_MODEL
from sdtune.paths import scanned_dir

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
VAE_EXTS = (".safetensors", ".pt", ".ckpt")
LORA_EXTS = (".safetensors", ".pt")
HYPERNET_EXTS = (".pt", ".safetensors")
PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.webp", ".webp")
A1111_LAYOUT = {"ckpt": "models/Stable-diffusion", "vae": "models/VAE", "lora": "models/Lora",
                "hypernetwork": "models/hypernetworks", "embeddings": "embeddings"}
MAX_LISTED = 5000  # files per folder listing: a mistaken --data-dir / does not walk the whole disk


class PathRefused(SdtuneError):
    """A request named a path outside the configured folders."""


def confine(root: Path, relative: str) -> Path:
    """`root / relative`, resolved, refused unless it stays inside `root` (symlinks followed)."""
    if not isinstance(relative, str) or "\x00" in relative:
        raise PathRefused("the path is not text")
    if Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise PathRefused(f"{relative!r}: give a path relative to the configured folder, not an absolute one")
    if any(part == ".." for part in Path(relative.replace("\\", "/")).parts):
        raise PathRefused(f"{relative!r}: '..' is not allowed in paths")
    base = root.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise PathRefused(f"{relative!r} leads outside {root.name or root} (a symlink?); use files inside it")
    return target


@dataclass
class ModelFile:
    """One file in a model folder, as the UI and A1111's list endpoints show it."""

    name: str       # path relative to its folder without extension: A1111's model / tag name ("style/ink")
    path: Path
    preview: Path | None = None

    @property
    def filename(self) -> str:
        return str(self.path)


@dataclass
class ModelFolders:
    """Where models, outputs and training runs live (all optional except outputs and runs)."""

    ckpt: Path | None = None
    vae: Path | None = None
    lora: Path | None = None
    hypernetwork: Path | None = None
    embeddings: Path | None = None
    outputs: Path = field(default_factory=lambda: Path("outputs"))
    runs: Path = field(default_factory=lambda: Path("runs"))
    datasets: list[Path] = field(default_factory=list)  # folders the Train page may browse (default: runs' parent)

    @classmethod
    def from_options(cls, *, data_dir: Path | None = None, outputs: Path | None = None, runs: Path | None = None,
                     **folders: Path | None) -> "ModelFolders":
        """Folders from `sdtune ui` options: an A1111 `--data-dir` fills the ones not given on their own."""
        chosen: dict[str, Path | None] = {}
        for key, sub in A1111_LAYOUT.items():
            given = folders.get(f"{key}_dir")
            if given is not None:
                if not Path(given).expanduser().is_dir():
                    raise SdtuneError(f"--{key}-dir {given}: no such folder")
                chosen[key] = Path(given).expanduser()
            elif data_dir is not None and (Path(data_dir).expanduser() / sub).is_dir():
                chosen[key] = Path(data_dir).expanduser() / sub
            else:
                chosen[key] = None
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise SdtuneError(f"--data-dir {data_dir}: no such folder; point it at an A1111 install (the folder "
                              "with models/ and embeddings/)")
        out = Path(outputs).expanduser() if outputs else (Path(data_dir).expanduser() / "outputs" if data_dir
                                                          else Path("outputs"))
        run_dir = Path(runs).expanduser() if runs else Path("runs")
        return cls(outputs=out, runs=run_dir, datasets=[run_dir.resolve().parent], **chosen)

    # -- listings -------------------------------------------------------------------------------------------

    @staticmethod
    def _walk(root: Path | None, exts: tuple[str, ...]) -> Iterator[ModelFile]:
        if root is None or not root.is_dir():
            return
        count = 0
        for dirpath, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if scanned_dir(dirpath, d))
            for f in sorted(files):
                low = f.lower()
                if f.startswith(".") or not low.endswith(exts) or ".preview." in low:
                    continue
                p = Path(dirpath) / f
                count += 1
                if count > MAX_LISTED:
                    return
                rel = p.relative_to(root).with_suffix("").as_posix()
                yield ModelFile(name=rel, path=p, preview=_preview_of(p))

    def checkpoints(self) -> list[ModelFile]:
        """The bundled model first, then the checkpoint files (A1111's models/Stable-diffusion)."""
        from sdtune.models.bundled import bundled_model_path

        files = [ModelFile(name=BUNDLED_MODEL, path=bundled_model_path(check=False))]
        files += list(self._walk(self.ckpt, CHECKPOINT_EXTS))
        if self.ckpt is not None and self.ckpt.is_dir():  # diffusers folders too (A1111 has none; sdtune loads them)
            files += [ModelFile(name=d.name, path=d, preview=_preview_of(d)) for d in sorted(self.ckpt.iterdir())
                      if d.is_dir() and (d / "model_index.json").is_file()]
        return files

    def vaes(self) -> list[ModelFile]:
        return list(self._walk(self.vae, VAE_EXTS))

    def loras(self) -> list[ModelFile]:
        return list(self._walk(self.lora, LORA_EXTS))

    def hypernetworks(self) -> list[ModelFile]:
        return list(self._walk(self.hypernetwork, HYPERNET_EXTS))

    def find(self, kind: str, name: str) -> ModelFile:
        """A listed file by its A1111 name (the file name, its stem or its relative path; case-insensitive as a
        second try), else a one-line error naming what exists."""
        listing = {"ckpt": self.checkpoints, "vae": self.vaes, "lora": self.loras,
                   "hypernetwork": self.hypernetworks}[kind]()
        wanted = str(name).strip()
        if kind == "ckpt":
            wanted = wanted.split(" [", 1)[0]  # A1111's titles: "name.safetensors [hash]"
        for pass_ in (str, str.lower):
            for f in listing:
                keys = {f.name, f.path.name, f.path.stem, f.path.relative_to(f.path.parent).as_posix()}
                if pass_(wanted) in {pass_(k) for k in keys}:
                    return f
        names = ", ".join(f.name for f in listing[:10]) or "none"
        raise SdtuneError(f"{kind} {name!r} not found; available: {names}")


def _preview_of(path: Path) -> Path | None:
    """A1111's preview images beside a model file: NAME.preview.png, then NAME.png (and jpg/webp)."""
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate != path and candidate.is_file():
            return candidate
    return None
