"""`sdtune dataset check`: look at a training folder before spending hours on it.

Reports counts, sizes, aspect ratios, modes, captions, unreadable files and near-duplicates, then the known
pitfalls with advice. The heuristics are deliberately simple and documented here:

* near-duplicates: a 64-bit difference hash (dHash: 9x8 greyscale, sign of horizontal differences) within
  HASH_DISTANCE bits *and* 8x8 RGB thumbnails (0..1) that differ nowhere by more than THUMB_DISTANCE (so the
  same layout in another colour is not a duplicate, while a re-saved, resized, slightly cropped, brightened or
  shifted copy is); pairs are grouped transitively.
* mixed styles (style runs: hypernetwork, LoRA, or no method given): a mix of black-and-white and colour images
  (between 10% and 90% with colourfulness < GREY_COLOURFULNESS, Hasler & Suesstrunk's metric), or a wide spread of
  colourfulness (std > COLOUR_SPREAD) or of edge density (fraction of pixels with a strong gradient on a
  128-pixel copy; std > EDGE_SPREAD) across the images.
* image counts per method: TI 3-20, DreamBooth 10-20, LoRA 20+, hypernetwork 50+ (community rules of thumb).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from sdtune.training import captions as cap
from sdtune.training import data
from sdtune.training import images as imgs

HASH_DISTANCE = 6
THUMB_DISTANCE = 0.15
GREY_COLOURFULNESS = 0.03
COLOUR_SPREAD = 0.15
EDGE_SPREAD = 0.08
EDGE_STEP = 0.12  # a gradient (|dx| + |dy|, 0..2) above this counts as an edge pixel
FEATURE_SIZE = 128

METHODS: dict[str, tuple[str, int, int | None]] = {
    "ti": ("Textual Inversion", 3, 20),
    "dreambooth": ("DreamBooth", 10, 20),
    "lora": ("LoRA", 20, None),
    "hypernetwork": ("Hypernetwork", 50, None),
}
STYLE_METHODS = ("lora", "hypernetwork")


# ------------------------------------------------------------------------------------------ per-image features

def dhash_bits(img: Image.Image) -> np.ndarray:
    """The 64-bit difference hash as 64 booleans."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    return (g[:, 1:] > g[:, :-1]).reshape(-1)


def thumbnail(img: Image.Image) -> np.ndarray:
    """8x8 RGB thumbnail in [0, 1] (colour layout for the near-duplicate test)."""
    return np.asarray(img.resize((8, 8), Image.Resampling.BOX), dtype=np.float32).reshape(-1) / 255.0


def style_features(img: Image.Image) -> dict[str, float]:
    """Colourfulness (Hasler & Suesstrunk 2003, on 0..1 RGB: 0 for black-and-white, ~0.2 for a colourful photo),
    mean brightness, brightness spread (contrast) and edge density."""
    small = img.copy()
    small.thumbnail((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BOX)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourful = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    luma = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
    edges = 0.0
    if min(luma.shape) > 1:
        grad = np.abs(np.diff(luma, axis=1))[:-1, :] + np.abs(np.diff(luma, axis=0))[:, :-1]
        edges = float((grad > EDGE_STEP).mean())
    return {"colourfulness": colourful, "brightness": float(luma.mean()),
            "contrast": float(luma.std()), "edges": edges}


def near_duplicate_groups(bits: np.ndarray, thumbs: np.ndarray, *, max_bits: int = HASH_DISTANCE,
                          max_thumb: float = THUMB_DISTANCE) -> list[list[int]]:
    """Groups (index lists, each sorted, groups sorted) of images that are near-duplicates of one another."""
    n = len(bits)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 64):
        ham = (bits[start:start + 64, None, :] != bits[None, :, :]).sum(-1)
        for a, b in zip(*np.nonzero(ham <= max_bits)):
            a, b = int(a) + start, int(b)
            if a < b and np.abs(thumbs[a] - thumbs[b]).max() <= max_thumb:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


# --------------------------------------------------------------------------------------------------- the report

@dataclass
class Pitfall:
    level: str      # "error" (must fix before training), "warning" (likely hurts results), "note"
    message: str
    advice: str = ""


@dataclass
class CheckReport:
    folder: str
    method: str | None
    resolution: int
    image_files: int = 0
    readable: int = 0
    unreadable: list[list[str]] = field(default_factory=list)   # [relative path, reason]
    ignored_files: list[str] = field(default_factory=list)
    skipped_folders: list[list[Any]] = field(default_factory=list)  # [name, images inside]
    concepts: list[list[Any]] = field(default_factory=list)   # [folder, repeats, images]
    sizes: dict[str, list[int]] = field(default_factory=dict)
    aspect: dict[str, Any] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    exif_rotated: int = 0
    captions: dict[str, Any] = field(default_factory=dict)
    near_duplicates: list[list[str]] = field(default_factory=list)
    style: dict[str, float] = field(default_factory=dict)
    pitfalls: list[Pitfall] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.readable > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usable"] = self.usable
        return d

    def format(self) -> str:
        L: list[str] = []
        what = f", method {METHODS[self.method][0]}" if self.method else ""
        L.append(f"dataset:  {self.folder} (resolution {self.resolution}{what})")
        L.append(f"images:   {self.readable} readable of {self.image_files} image files"
                 + (f", {len(self.unreadable)} unreadable" if self.unreadable else "")
                 + (f", {len(self.ignored_files)} other files ignored" if self.ignored_files else ""))
        for name, repeats, n in self.concepts:
            L.append(f"          {name}: {n} images x {repeats} repeats")
        if self.readable:
            w, h = self.sizes["width"], self.sizes["height"]
            L.append(f"sizes:    width {w[0]}/{w[1]}/{w[2]}, height {h[0]}/{h[1]}/{h[2]} (min/median/max)")
            a = self.aspect
            L.append(f"aspect:   {a['square']} square, {a['landscape']} landscape, {a['portrait']} portrait "
                     f"(w/h {a['min']:.2f} to {a['max']:.2f})")
            L.append("modes:    " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items(), key=lambda x: -x[1]))
                     + (f"; {self.exif_rotated} EXIF-rotated" if self.exif_rotated else ""))
            c = self.captions
            L.append(f"captions: {c['with_caption']} with caption, {len(c['missing'])} missing, {len(c['empty'])} empty"
                     + (f", {c['from_folder']} from folder names" if c["from_folder"] else "")
                     + f"; {c['unique']} distinct")
            dup = "none" if not self.near_duplicates else f"{len(self.near_duplicates)} group(s): " + "; ".join(
                " ~ ".join(g) for g in self.near_duplicates[:5]) + (" ..." if len(self.near_duplicates) > 5 else "")
            L.append(f"near-duplicates: {dup}")
            s = self.style
            L.append(f"style:    colourfulness {s['colourfulness_mean']:.2f} "
                     f"(spread {s['colourfulness_std']:.2f}), edge density {s['edges_mean']:.3f} "
                     f"(spread {s['edges_std']:.3f}), {s['black_and_white']} black-and-white")
        if self.unreadable:
            L.append("unreadable: " + data.name_list([f"{r} ({why})" for r, why in self.unreadable], 10))
        if self.pitfalls:
            L.append("pitfalls:")
            for p in self.pitfalls:
                L.append(f"  {p.level}: {p.message}")
                if p.advice:
                    L.append(f"    -> {p.advice}")
        n_warn = sum(p.level != "note" for p in self.pitfalls)
        L.append("verdict:  " + ("usable" + (f" ({n_warn} problem(s) above)" if n_warn else "") if self.usable
                                 else "NOT usable: no readable images"))
        return "\n".join(L)


def check_dataset(folder: str | Path, *, method: str | None = None, resolution: int = 512,
                  progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Inspect `folder` (plain or kohya `<repeats>_<name>` layout). Raises SdtuneError only when the folder is
    missing or a file; everything else, including "no images", goes into the report."""
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    root = data.check_folder(folder)
    listing = data.list_folder(root)
    rep = CheckReport(folder=str(root), method=method, resolution=resolution, image_files=len(listing.images))
    rep.ignored_files = [f.relative_to(root).as_posix() for f in listing.other]
    rep.skipped_folders = [[d.name, n] for d, n in listing.skipped_dirs]
    ok: list[data.Probe] = []
    bits, thumbs, feats = [], [], []
    for k, (path, repeats, concept) in enumerate(listing.images):
        if progress:
            progress(k, len(listing.images))
        pr, rgb = data.probe_file(path, root, repeats, concept, cap.CAPTION_EXTS, draft=FEATURE_SIZE * 2)
        if pr.error or rgb is None:
            rep.unreadable.append([pr.rel, pr.error or "unreadable"])
            continue
        ok.append(pr)
        bits.append(dhash_bits(rgb))
        thumbs.append(thumbnail(rgb))
        feats.append(style_features(rgb))
    rep.readable = len(ok)
    rep.concepts = [[d.name, r, sum(1 for p in ok if p.path.parent == d)] for d, r in listing.concept_dirs]
    P = rep.pitfalls

    if rep.unreadable:
        P.append(Pitfall("error", f"{len(rep.unreadable)} unreadable image file(s): "
                         + data.name_list([f"{r} ({why})" for r, why in rep.unreadable]),
                         "fix or remove them; training refuses to start until then, or skips them with --skip-bad"))
    if not ok:
        found = data.found_instead(listing)
        P.append(Pitfall("error", "no readable images" + (f" (found {found})" if found else " (the folder is empty)"),
                         f"put images ({', '.join(imgs.IMAGE_EXTS)}) in the folder, or kohya-style in "
                         "<repeats>_<name> subfolders"))
        return rep

    _describe(rep, ok, feats)
    groups = near_duplicate_groups(np.stack(bits), np.stack(thumbs))
    rep.near_duplicates = [[ok[i].rel for i in g] for g in groups]
    _pitfalls(rep, ok, feats, groups, listing)
    return rep


def _describe(rep: CheckReport, ok: list[data.Probe], feats: list[dict[str, float]]) -> None:
    sizes = [p.size for p in ok]
    rep.sizes = data.size_summary(sizes)
    ratios = [w / h for w, h in sizes]
    rep.aspect = {"square": sum(0.9 <= r <= 1.1 for r in ratios), "landscape": sum(r > 1.1 for r in ratios),
                  "portrait": sum(r < 0.9 for r in ratios), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    rep.modes = dict(Counter(p.mode for p in ok))
    rep.exif_rotated = sum(p.exif_rotated for p in ok)
    caps = [p.caption for p in ok if p.caption]
    rep.captions = {
        "with_caption": sum(p.caption_source == "file" and bool(p.caption) for p in ok),
        "missing": [p.rel for p in ok if p.caption_file is None and p.caption_source != "folder"],
        "empty": [p.rel for p in ok if p.caption_file is not None and not p.caption],
        "from_folder": sum(p.caption_source == "folder" for p in ok),
        "not_utf8": [p.caption_file.name for p in ok if p.caption_problem and p.caption_file],
        "unique": len(set(caps)),
    }
    col = [f["colourfulness"] for f in feats]
    edg = [f["edges"] for f in feats]
    rep.style = {"colourfulness_mean": round(statistics.fmean(col), 4),
                 "colourfulness_std": round(statistics.pstdev(col), 4),
                 "edges_mean": round(statistics.fmean(edg), 4), "edges_std": round(statistics.pstdev(edg), 4),
                 "brightness_std": round(statistics.pstdev(f["brightness"] for f in feats), 4),
                 "black_and_white": sum(c < GREY_COLOURFULNESS for c in col)}


def _pitfalls(rep: CheckReport, ok: list[data.Probe], feats: list[dict[str, float]], groups: list[list[int]],
              listing: data.Listing) -> None:
    P = rep.pitfalls
    n = len(ok)
    res = rep.resolution
    if rep.method:
        name, lo, hi = METHODS[rep.method]
        span = f"{lo}-{hi}" if hi else f"{lo} or more"
        if n < lo:
            P.append(Pitfall("warning", f"only {n} image(s); {name} usually needs {span}",
                             "add more varied images (different poses, backgrounds, lighting)" if rep.method != "ti"
                             else "add a few more varied images of the concept"))
        elif hi and n > hi * 3:
            P.append(Pitfall("note", f"{n} images is many for {name} (usually {span})",
                             "fine if they are all the one concept; otherwise pick the best and most varied ones"))
    elif n < 3:
        P.append(Pitfall("warning", f"only {n} image(s)", "3 or more varied images generalise much better"))

    if groups:
        extra = sum(len(g) - 1 for g in groups)
        too_alike = extra / n > 0.3
        shown = "; ".join(" ~ ".join(g) for g in rep.near_duplicates[:3]) + ("; ..." if len(groups) > 3 else "")
        msg = (f"images too alike: {extra} of {n} images are near-duplicates of another ({shown})" if too_alike else
               f"{len(groups)} group(s) of near-duplicate images ({extra} extra copies): {shown}")
        P.append(Pitfall("warning", msg, "keep one image of each group: copies weigh more and push the model to "
                         "memorise them instead of learning the concept"))

    col = [f["colourfulness"] for f in feats]
    edges = [f["edges"] for f in feats]
    bw = rep.style["black_and_white"]
    style_run = rep.method in STYLE_METHODS or rep.method is None
    if style_run and n >= 3:
        why = []
        if 0.1 <= bw / n <= 0.9:
            why.append(f"{bw} of {n} images are black-and-white")
        if statistics.pstdev(col) > COLOUR_SPREAD:
            why.append(f"colourfulness varies widely (spread {statistics.pstdev(col):.2f})")
        if statistics.pstdev(edges) > EDGE_SPREAD:
            why.append(f"detail varies widely (edge-density spread {statistics.pstdev(edges):.3f})")
        if why:
            P.append(Pitfall("warning", "styles look mixed: " + "; ".join(why) + " (matters for a style run)",
                             "for a style, keep images of that one style; for a subject, this variety is fine"))

    tiny = [p for p in ok if min(p.size) < res / 2]
    small = [p for p in ok if res / 2 <= min(p.size) < res]
    if tiny:
        P.append(Pitfall("warning", f"{len(tiny)} image(s) are less than half the training size {res}: "
                         + data.name_list([f"{p.rel} ({p.size[0]}x{p.size[1]})" for p in tiny]),
                         "they are upscaled and come out blurry: replace them with larger ones, or train at a lower "
                         "--resolution if the model supports it"))
    if small:
        P.append(Pitfall("note", f"{len(small)} image(s) are smaller than {res} and will be upscaled a little"))
    long_ = [p for p in ok if max(p.size) / min(p.size) > 2]
    if long_:
        P.append(Pitfall("note", f"{len(long_)} image(s) are longer than 2:1: "
                         + data.name_list([p.rel for p in long_]),
                         "a square centre crop cuts a lot of them: crop by hand, or train with aspect-ratio buckets"))

    c = rep.captions
    if c["missing"] or c["empty"]:
        without = len(c["missing"]) + len(c["empty"])
        advice = {"ti": "captions are only used by templates with [filewords]; fine without",
                  "dreambooth": "DreamBooth can use one instance prompt for all; captions are optional",
                  "lora": "caption each image: LoRA attaches what the captions leave out to the trigger word",
                  "hypernetwork": "caption each image with its content, so the style is what is learned"}
        P.append(Pitfall("note" if rep.method in ("ti", "dreambooth") else "warning",
                         f"{without} of {n} images have no caption: "
                         + data.name_list(c["missing"] + c["empty"]),
                         advice.get(rep.method or "", "add <name>.txt captions if your method uses them")))
    if c["not_utf8"]:
        P.append(Pitfall("warning", f"{len(c['not_utf8'])} caption file(s) are not UTF-8: "
                         + data.name_list(c["not_utf8"]), "re-save them as UTF-8"))
    if n > 1 and c["unique"] == 1 and c["with_caption"] == n and rep.method in ("lora", "hypernetwork"):
        P.append(Pitfall("note", "every image has the same caption",
                         "describe what differs between the images so the model does not tie it to the trigger"))
    if rep.exif_rotated:
        P.append(Pitfall("note", f"{rep.exif_rotated} image(s) carry an EXIF rotation; they are trained upright"))
    for d, k in listing.skipped_dirs:
        if k:
            P.append(Pitfall("note", f"folder {d.name!r} ({k} images) is skipped",
                             f"name it <repeats>_<name> (e.g. 1_{d.name}) to include it"))
    if rep.ignored_files:
        P.append(Pitfall("note", f"{len(rep.ignored_files)} file(s) that are not images are ignored: "
                         + data.name_list(rep.ignored_files)))
