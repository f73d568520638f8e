"""`EmbeddingLibrary`: embeddings from folders and files, kept up to date while a model stays loaded.

    lib = EmbeddingLibrary(["embeddings/", "extra/star.pt"], pipe=loaded.pipe)
    lib.refresh()        # cheap: one stat per file; reads only files that are new or changed
    lib.registry         # the `prompts.EmbeddingRegistry` a `WeightedPromptEncoder` uses

Folders are scanned recursively. A file counts as changed when its (mtime_ns, size, inode) changes, so files
overwritten in place and files replaced by an atomic rename are both noticed; removed files drop their names.
Each embedding is usable by its file's stem (A1111) and, when the file records it and it differs, by the token it
was trained as (`<star>`). Embeddings whose vectors do not fit the model's text encoders (wrong width or family)
are skipped with a message naming the expected and the found shapes; so are unreadable files and names already
taken (the first file in path order keeps the name). Images without an embedding (no `sd-ti-embedding` chunk
and no data in the pixels) are ignored.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sdtune.errors import SdtuneError
from sdtune.paths import scanned_dir
from sdtune.prompts.embeddings import EmbeddingRegistry
from sdtune.adapters.textual_inversion.files import EMBEDDING_EXTS, FAMILY_KEYS, Embedding, read_embedding

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 64 * 2**20  # embeddings are kilobytes; larger weight files in a folder are models, not read


@dataclass
class _FileState:
    signature: tuple[int, int, int]
    names: list[str] = field(default_factory=list)
    embedding: Embedding | None = None
    note: str | None = None


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # messages
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.skipped)


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _pair_stat(path: Path, pair: tuple[Path, Path] | None) -> os.stat_result:
    """The stat that stands for `path`: its own, or for a diffusers SDXL pair the newer file's."""
    if pair is None:
        return path.stat()
    return max((p.stat() for p in pair), key=lambda st: st.st_mtime_ns)


def _slots_of(pipe: Any) -> list[tuple[str, int]]:
    from sdtune.prompts.encoder import encoder_slots

    return [(s.key, s.width) for s in encoder_slots(pipe)]


def expected_shapes(slots: list[tuple[str, int]]) -> str:
    return " + ".join(f"{k} [n, {w}]" for k, w in slots)


FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def family_of_keys(keys: Iterable[str]) -> str | None:
    """sd1 / sd2 / sdxl from an embedding's encoder keys (clip_l; clip_h; clip_l + clip_g), else None."""
    found = set(keys)
    return next((fam for fam, ks in FAMILY_KEYS.items() if found == set(ks)), None)


def misfit_note(emb: Embedding, path: Path, slots: list[tuple[str, int]], why: str) -> str:
    """The one warning for an embedding that does not fit: it names both families when they differ (A1111 hides
    such embeddings silently; a user should know why the word did nothing), else the shapes."""
    mine, theirs = family_of_keys(k for k, _ in slots), family_of_keys(emb.vectors)
    if mine and theirs and mine != theirs:
        return (f"skipped embedding {emb.name!r} ({path.name}): it is an {FAMILY_LABELS[theirs]} embedding and this "
                f"model is {FAMILY_LABELS[mine]} ({why}); its name stays plain text in prompts: use it with an "
                f"{FAMILY_LABELS[theirs]} model")
    return f"skipped embedding {emb.name!r} ({path.name}): it does not fit this model: {why}"


def fit_check(emb: Embedding, slots: list[tuple[str, int]]) -> str | None:
    """None when `emb` has vectors for every encoder slot (key, width), else why not."""
    if not slots:
        return None
    problem = False
    for key, width in slots:
        t = emb.vectors.get(key)
        if t is None and len(slots) == 1:
            fits = [v for v in emb.vectors.values() if v.shape[1] == width]
            t = fits[0] if len(fits) == 1 else None
        if t is None or t.shape[1] != width:
            problem = True
    if len(slots) == 1 and len(emb.vectors) > 1:
        problem = True  # an SDXL embedding on a one-encoder model
    if not problem:
        return None
    return f"expected {expected_shapes(slots)}, found {emb.shapes()}"


class EmbeddingLibrary:
    """Embeddings from `sources` (folders, scanned recursively, and files) in an `EmbeddingRegistry`.

    pipe: the pipeline whose text encoders the embeddings must fit (None: no check). echo: where messages about
    skipped files go (default: logging warnings)."""

    def __init__(self, sources: Iterable[str | Path] = (), *, pipe: Any = None,
                 echo: Callable[[str], None] | None = None, registry: EmbeddingRegistry | None = None) -> None:
        self.registry = registry if registry is not None else EmbeddingRegistry()
        self.sources: list[Path] = []
        self._slots = _slots_of(pipe) if pipe is not None else []
        self._files: dict[Path, _FileState] = {}
        self._owner: dict[str, Path] = {}       # name -> file that holds it
        self.echo = echo or log.warning
        self.last = Changes()
        for s in sources:
            self.add_source(s, refresh=False)
        self.refresh()

    # -- sources --------------------------------------------------------------------------------------------

    def add_source(self, source: str | Path, *, refresh: bool = True) -> Changes:
        """Watch another folder or file (an error if it does not exist)."""
        p = Path(source).expanduser()
        if not p.exists():
            raise SdtuneError(f"embeddings {p}: no such file or folder")
        if p.is_file() and p.suffix.lower() not in EMBEDDING_EXTS:
            raise SdtuneError(f"embeddings {p}: not an embedding file ({', '.join(EMBEDDING_EXTS)})")
        if p not in self.sources:
            self.sources.append(p)
        return self.refresh() if refresh else Changes()

    add = add_source

    def remove_source(self, source: str | Path) -> Changes:
        p = Path(source).expanduser()
        self.sources = [s for s in self.sources if s != p]
        return self.refresh()

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __len__(self) -> int:
        return len(self._owner)

    def path_of(self, name: str) -> Path | None:
        return self._owner.get(name)

    def embedding(self, name: str) -> Embedding | None:
        p = self._owner.get(name)
        return self._files[p].embedding if p is not None else None

    @property
    def skipped(self) -> dict[Path, str]:
        return {p: s.note for p, s in self._files.items() if s.note}

    # -- refresh --------------------------------------------------------------------------------------------

    def _scan(self) -> dict[Path, os.stat_result]:
        """Every embedding file under the sources with its stat. The text_encoder_2 file of a diffusers SDXL pair
        is read with its partner, so a folder scan lists only the partner, with the newer file's stat (a change to
        either file reloads the pair)."""
        from sdtune.adapters.textual_inversion.diffusers_pair import is_second_of_pair, pair_of

        found: dict[Path, os.stat_result] = {}
        for src in self.sources:
            try:
                if src.is_file():
                    found[src] = _pair_stat(src, pair_of(src))
                    continue
            except OSError:
                continue
            for root, dirs, files in os.walk(src):
                dirs[:] = sorted(d for d in dirs if scanned_dir(root, d))
                for f in files:
                    if f.startswith(".") or os.path.splitext(f)[1].lower() not in EMBEDDING_EXTS:
                        continue
                    p = Path(root) / f
                    try:
                        if is_second_of_pair(p):
                            continue
                        found[p] = _pair_stat(p, pair_of(p))
                    except OSError:
                        continue
        return found

    def _drop(self, path: Path) -> list[str]:
        state = self._files.pop(path, None)
        if state is None:
            return []
        for n in state.names:
            if self._owner.get(n) == path:
                del self._owner[n]
                self.registry.remove(n)
        return list(state.names)

    def _load(self, path: Path, st: os.stat_result, changes: Changes) -> None:
        state = _FileState(_signature(st))
        self._files[path] = state
        try:
            if st.st_size > MAX_FILE_BYTES and path.suffix.lower() not in (".png", ".webp"):
                raise SdtuneError(f"{st.st_size / 2**20:.0f} MB is too large for an embedding (a model file?)")
            emb = read_embedding(path)
        except SdtuneError as exc:
            if path.suffix.lower() in (".png", ".webp") and "without an embedding" in str(exc):
                return  # an ordinary image
            state.note = f"skipped {path}: {exc}"
        except RecursionError:  # a hostile file nested too deeply for a reader (safetensors headers are checked)
            state.note = f"skipped {path}: its contents are nested too deeply to be an embedding"
        else:
            why = fit_check(emb, self._slots)
            if why is not None:
                state.note = misfit_note(emb, path, self._slots, why)
            else:
                state.embedding = emb
                for name in [emb.name] + ([emb.token] if emb.token and emb.token != emb.name else []):
                    owner = self._owner.get(name)
                    if owner is not None and owner != path:
                        if name == emb.name:
                            changes.skipped.append(f"embedding name {name!r} of {path} is already used by {owner}; "
                                                   "rename one of the files")
                        continue
                    try:
                        self.registry.add(name, dict(emb.vectors))
                    except SdtuneError as exc:
                        if name == emb.name:
                            state.note = f"skipped {path}: {exc}"
                        continue
                    self._owner[name] = path
                    state.names.append(name)
        if state.note:
            changes.skipped.append(state.note)

    def refresh(self) -> Changes:
        """Pick up added, changed and removed files; returns what changed (also kept as `last`)."""
        t0 = time.perf_counter()
        changes = Changes()
        found = self._scan()
        for path in [p for p in self._files if p not in found]:
            changes.removed += self._drop(path)
        for path in sorted(found):
            st = found[path]
            old = self._files.get(path)
            if old is not None and old.signature == _signature(st):
                continue
            before = self._drop(path) if old is not None else []
            self._load(path, st, changes)
            now = self._files[path].names
            changes.changed += [n for n in now if n in before]
            changes.added += [n for n in now if n not in before]
            changes.removed += [n for n in before if n not in now]
        # a name freed by a removal may now belong to a file that was refused it
        if changes.removed:
            for path, state in list(self._files.items()):
                if state.embedding is not None and any(n not in self._owner for n in [state.embedding.name]) \
                        and state.embedding.name not in state.names:
                    self._drop(path)
                    self._load(path, found[path], changes)
                    changes.added += self._files[path].names
        for msg in changes.skipped:
            self.echo(msg)
        changes.seconds = time.perf_counter() - t0
        self.last = changes
        return changes
