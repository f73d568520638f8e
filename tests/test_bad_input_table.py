"""Bad input over every subcommand, as one table (issue 19): each row is a command line that must end in exit code
2 and exactly one line `error: ...` on stderr (no traceback), with no file under the inputs or the output folder
created, changed or removed (sha256 of every file before and after).

Rows run in-process (`sdtune.cli.main`). Loading a model is forbidden unless a row says it needs one (`LOADS`):
bad input must be refused before anything slow, which also keeps the table fast. Paths this process cannot read or
write are simulated through `sdtune.paths.access`, the one seam every check goes through, because the tests run
as root, which bypasses permission bits; `test_real_*` at the end run the real entry point on paths even root is
refused (sysfs) and on a real size limit (RLIMIT_FSIZE, which makes writes fail with EFBIG as a full disk would).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune.cli.testing import run_cli

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("hash_cache")]

SRC = Path(__file__).resolve().parents[1] / "src"
BAD_UTF8 = b"a \xff\xfe b".decode("utf-8", "surrogateescape")  # what Python makes of invalid UTF-8 in argv
LONG_NAME = "n" * 300  # longer than any file system's name limit (255)


class Evil:
    """Unpickling this runs a shell command that creates a file the table would notice."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.target}",)


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _png(path: Path, infotext: str | None) -> Path:
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: Any) -> dict[str, str]:
    """Every kind of bad (and a few good) input files and folders, built once; the rows must not change them."""
    from sdtune.toy.testing import write_toy_dataset

    root = tmp_path_factory.mktemp("inputs")
    p: dict[str, Path] = {}
    for ext in ("safetensors", "ckpt", "pt", "png", "toml"):
        p[f"empty_{ext}"] = root / f"empty.{ext}"
        p[f"empty_{ext}"].write_bytes(b"")
    for ext in ("safetensors", "ckpt", "pt", "png", "bin"):
        p[f"garbage_{ext}"] = root / f"garbage.{ext}"
        p[f"garbage_{ext}"].write_bytes(bytes(range(256)) * 8)
    p["truncated"] = _safetensors(root / "truncated.safetensors",
                                  b'{"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}', b"\0" * 4)
    p["huge_header"] = root / "huge_header.safetensors"
    p["huge_header"].write_bytes(struct.pack("<Q", 2**62) + b"{}")
    p["nested"] = _safetensors(root / "nested.safetensors", ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": '
                               '[0, 4]}, "__metadata__": {"a": ' + "[" * 5000 + "]" * 5000 + "}}").encode(), b"\0" * 4)
    p["unknown_kind"] = _safetensors(root / "unknown.safetensors",
                                     b'{"foo.bar": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    p["evil_ckpt"] = root / "evil.ckpt"
    p["evil_ckpt"].write_bytes(pickle.dumps({"state_dict": Evil(root / "PWNED")}, protocol=2))
    p["evil_pt"] = root / "evil.pt"
    import torch

    torch.save({"emb": Evil(root / "PWNED2")}, p["evil_pt"])
    p["text"] = root / "notes.txt"
    p["text"].write_text("hello\n")
    p["png_plain"] = _png(root / "plain.png", None)
    p["png_garbled"] = _png(root / "garbled.png", "a cat\nSteps: abc, Sampler: nope, Seed: x, Size: 1x")
    p["png_nan"] = _png(root / "nan.png", "a cat\nSteps: 2, Sampler: Euler a, CFG scale: nan, Seed: 1, Size: 64x64, "
                        "Model: tiny")
    p["png_nomodel"] = _png(root / "nomodel.png", "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                            "Size: 64x64, Model: some-model-elsewhere")
    p["bad_toml"] = root / "bad.toml"
    p["bad_toml"].write_text("steps = [\n")
    p["ti_toml"] = root / "ti.toml"
    p["ti_toml"].write_text('method = "ti"\n')
    p["neg_toml"] = root / "neg.toml"
    p["neg_toml"].write_text("steps = -5\n")
    p["unknown_toml"] = root / "unknown.toml"
    p["unknown_toml"].write_text("stepz = 5\n")
    p["latin1_toml"] = root / "latin1.toml"
    p["latin1_toml"].write_bytes("output_name = 'caf\xe9'\n".encode("latin-1"))
    p["data"] = write_toy_dataset(root / "data", 2, size=32)
    p["empty_dir"] = root / "empty_dir"
    p["empty_dir"].mkdir()
    p["garbage_data"] = root / "garbage_data"
    p["garbage_data"].mkdir()
    (p["garbage_data"] / "a.png").write_bytes(b"not a png")
    (p["garbage_data"] / "a.txt").write_text("a caption")
    p["unreadable"] = root / "unreadable.safetensors"  # readable to root; `access` below denies it
    p["unreadable"].write_bytes(p["unknown_kind"].read_bytes())
    p["unreadable_png"] = _png(root / "unreadable.png", "a cat\nSteps: 2, Seed: 1, Size: 64x64, Model: tiny")
    p["unreadable_dir"] = write_toy_dataset(root / "unreadable_data", 2, size=32)
    p["data_unreadable_image"] = write_toy_dataset(root / "data_with_one_denied", 2, size=32)
    (p["data_unreadable_image"] / "000.png").rename(p["data_unreadable_image"] / "unreadable.png")
    p["ro_dir"] = root / "ro_dir"  # writable to root; `access` below denies writing
    p["ro_dir"].mkdir()
    p["afile"] = root / "afile"
    p["afile"].write_text("x")
    p["loop"] = root / "loop.safetensors"
    p["loop"].symlink_to(p["loop"])
    p["root"] = root
    return {k: str(v) for k, v in p.items()}


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        if not folder.exists():
            continue
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                if path.is_symlink():
                    out[str(path)] = "symlink"
                    continue
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class ModelLoaded(Exception):
    """A row got as far as loading a model: its bad input was not caught first."""


def _no_loading(*args: Any, **kwargs: Any) -> Any:
    raise ModelLoaded(f"load_model{args} was called before the bad input was refused")


class ServerStarted(Exception):
    """`sdtune ui` validated its options and would have started a server."""


# (id, command line with {placeholders}) - ids group rows by subcommand (the part before the first '/').
# Placeholders: inputs' names, {out} (a fresh path in an empty folder), {outdir} (that folder).
G = "generate 'a red circle' --out {out}"
T = "--data {data} --out {out}"
TI = T + " --token sks"
DB = T + " --class-prompt 'a photo of a shape'"
CASES: list[tuple[str, str | list[str]]] = [
    # -- generate: numbers
    ("generate/steps-negative", G + " --steps -1"),
    ("generate/steps-zero", G + " --steps 0"),
    ("generate/steps-huge", G + " --steps 99999999999999999999"),
    ("generate/steps-text", G + " --steps ten"),
    ("generate/cfg-nan", G + " --cfg nan"),
    ("generate/cfg-inf", G + " --cfg inf"),
    ("generate/cfg-text", G + " --cfg high"),
    ("generate/width-negative", G + " --width -64"),
    ("generate/width-zero", G + " --width 0"),
    ("generate/width-odd", G + " --width 65"),
    ("generate/height-huge", G + " --height 1000000"),
    ("generate/batch-size-zero", G + " -b 0"),
    ("generate/count-negative", G + " -n -3"),
    ("generate/clip-skip-zero", G + " --clip-skip 0"),
    ("generate/seed-huge", G + " --seed 99999999999999999999999"),
    ("generate/seed-text", G + " --seed abc"),
    ("generate/refiner-start-nan", G + " --refiner-start nan"),
    ("generate/refiner-start-above-1", G + " --refiner-start 1.5"),
    ("generate/sampler-unknown", G + " --sampler 'Euler z'"),
    ("generate/dtype-unknown", G + " --dtype fp8"),
    ("generate/device-unknown", G + " --device tpu"),
    ("generate/syntax-unknown", G + " --prompt-syntax bbcode"),
    # -- generate: paths
    ("generate/out-is-file", "generate x --out {afile}"),
    ("generate/out-under-file", "generate x --out {afile}/sub"),
    ("generate/out-read-only", "generate x --out {ro_dir}/images"),
    ("generate/out-nul", ["generate", "x", "--out", "out\0put"]),
    ("generate/out-name-too-long", "generate x --out {outdir}/" + LONG_NAME),
    ("generate/model-missing", G + " --model {root}/nope.safetensors"),
    ("generate/model-empty-dir", G + " --model {empty_dir}"),
    ("generate/model-unreadable", G + " --model {unreadable}"),
    ("generate/model-unreadable-dir", G + " --model {unreadable_dir}"),
    ("generate/model-text-file", G + " --model {text}"),
    ("generate/vae-missing", G + " --vae {root}/nope"),
    ("generate/vae-unreadable", G + " --vae {unreadable}"),
    ("generate/lora-missing", G + " --lora {root}/nope.safetensors"),
    ("generate/lora-folder", G + " --lora {empty_dir}"),
    ("generate/lora-unreadable", G + " --lora {unreadable}"),
    ("generate/lora-weight-text", G + " --lora {unknown_kind}:abc"),
    ("generate/lora-weight-nan", G + " --lora {unknown_kind}:nan"),
    ("generate/lora-dir-missing", G + " --lora-dir {root}/nope"),
    ("generate/lora-dir-file", G + " --lora-dir {afile}"),
    ("generate/lora-dir-unreadable", G + " --lora-dir {unreadable_dir}"),
    ("generate/hypernetwork-missing", G + " --hypernetwork {root}/nope.pt"),
    ("generate/hypernetwork-unreadable", G + " --hypernetwork {unreadable}"),
    ("generate/hypernetwork-strength-text", G + " --hypernetwork {evil_pt}:strong"),
    ("generate/hypernetwork-dir-missing", G + " --hypernetwork-dir {root}/nope"),
    ("generate/hypernetwork-dir-unreadable", G + " --hypernetwork-dir {unreadable_dir}"),
    ("generate/embeddings-missing", G + " --embeddings {root}/nope"),
    ("generate/embeddings-unreadable", G + " --embeddings {unreadable_dir}"),
    ("generate/from-png-missing", "generate --from-png {root}/nope.png --out {out}"),
    ("generate/from-png-folder", "generate --from-png {empty_dir} --out {out}"),
    ("generate/from-png-empty", "generate --from-png {empty_png} --out {out}"),
    ("generate/from-png-garbage", "generate --from-png {garbage_png} --out {out}"),
    ("generate/from-png-no-infotext", "generate --from-png {png_plain} --out {out}"),
    ("generate/from-png-garbled-infotext", "generate --from-png {png_garbled} --out {out}"),
    ("generate/from-png-cfg-nan", "generate --from-png {png_nan} --out {out}"),
    ("generate/from-png-model-elsewhere", "generate --from-png {png_nomodel} --out {out}"),
    ("generate/from-png-unreadable", "generate --from-png {unreadable_png} --out {out}"),
    ("generate/from-png-safetensors", "generate --from-png {unknown_kind} --out {out}"),
    # -- generate: names, encodings
    ("generate/no-prompt", "generate --out {out}"),
    ("generate/prompt-twice", "generate a --prompt b --out {out}"),
    ("generate/prompt-invalid-utf8", ["generate", BAD_UTF8, "--out", "{out}"]),
    ("generate/negative-invalid-utf8", ["generate", "x", "--negative", BAD_UTF8, "--out", "{out}"]),
    ("generate/unknown-option", G + " --stepz 3"),
    # -- train (every method): numbers
    ("train-lora/steps-zero", "train lora " + T + " --steps 0"),
    ("train-lora/steps-negative", "train lora " + T + " --steps -10"),
    ("train-lora/steps-text", "train lora " + T + " --steps many"),
    ("train-lora/lr-nan", "train lora " + T + " --lr nan"),
    ("train-lora/lr-inf", "train lora " + T + " --lr inf"),
    ("train-lora/lr-negative", "train lora " + T + " --lr -0.001"),
    ("train-lora/lr-zero", "train lora " + T + " --lr 0"),
    ("train-lora/batch-size-zero", "train lora " + T + " --batch-size 0"),
    ("train-lora/resolution-negative", "train lora " + T + " --resolution -64"),
    ("train-lora/flip-above-1", "train lora " + T + " --flip 2"),
    ("train-lora/identifier-empty", "train lora " + T + " --identifier ''"),
    ("train-lora/identifier-two-words", "train lora " + T + " --identifier 'sks dog'"),
    ("train-lora/class-data-without-class-prompt", "train lora " + T + " --class-data {outdir}"),
    ("train-lora/flip-nan", "train lora " + T + " --flip nan"),
    ("train-lora/seed-negative", "train lora " + T + " --seed -1"),
    ("train-lora/seed-huge", "train lora " + T + " --seed 99999999999999999999999"),
    ("train-lora/val-split-1", "train lora " + T + " --val-split 1"),
    # -- train: cross-validation (--cv-folds K) and --steps auto
    ("train-lora/cv-folds-one", "train lora " + T + " --cv-folds 1"),
    ("train-lora/cv-folds-negative", "train lora " + T + " --cv-folds -2"),
    ("train-lora/cv-folds-more-than-images", "train lora " + T + " --cv-folds 3 --steps 100 --save-every 10"),
    ("train-lora/cv-folds-with-val-split", "train lora " + T + " --cv-folds 2 --val-split 0.5"),
    ("train-lora/cv-folds-with-val-dir", "train lora " + T + " --cv-folds 2 --val-dir {data}"),
    ("train-lora/cv-folds-with-early-stop", "train lora " + T + " --cv-folds 2 --early-stop 2"),
    ("train-lora/cv-folds-without-checkpoints", "train lora " + T + " --cv-folds 2 --save-every 0"),
    ("train-lora/cv-folds-with-steps-auto", "train lora " + T + " --cv-folds 2 --steps auto"),
    ("train-lora/steps-auto-without-report", "train lora " + T + " --steps auto"),
    ("train-ti/steps-auto-without-report", "train ti " + T + " --steps auto"),
    ("train-lora/steps-auto-with-val-split", "train lora " + T + " --steps auto --val-split 0.5"),
    ("train-lora/noise-offset-inf", "train lora " + T + " --noise-offset inf"),
    ("train-lora/max-grad-norm-negative", "train lora " + T + " --max-grad-norm -1"),
    ("train-lora/rank-zero", "train lora " + T + " --rank 0"),
    ("train-lora/rank-negative", "train lora " + T + " --rank -4"),
    ("train-lora/alpha-nan", "train lora " + T + " --alpha nan"),
    ("train-lora/dropout-above-1", "train lora " + T + " --dropout 1.5"),
    ("train-lora/optimizer-unknown", "train lora " + T + " --optimizer sgdx"),
    ("train-lora/sample-every-without-prompt", "train lora " + T + " --sample-every 5"),
    ("train-lora/mixed-precision-fp16-cpu", "train lora " + T + " --mixed-precision fp16 --device cpu"),
    # -- train: paths
    ("train-lora/data-missing", "train lora --data {root}/nope --out {out}"),
    ("train-lora/data-is-file", "train lora --data {afile} --out {out}"),
    ("train-lora/data-empty", "train lora --data {empty_dir} --out {out}"),
    ("train-lora/data-garbage-images", "train lora --data {garbage_data} --out {out}"),
    ("train-lora/data-unreadable", "train lora --data {unreadable_dir} --out {out}"),
    ("train-lora/data-image-unreadable", "train lora --data {data_unreadable_image} --out {out}"),
    ("train-lora/no-data", "train lora --out {out}"),
    ("train-lora/out-is-file", "train lora --data {data} --out {afile}"),
    ("train-lora/out-under-file", "train lora --data {data} --out {afile}/run"),
    ("train-lora/out-read-only", "train lora --data {data} --out {ro_dir}/run"),
    ("train-lora/out-nul", ["train", "lora", "--data", "{data}", "--out", "r\0un"]),
    ("train-lora/model-missing", "train lora " + T + " --model {root}/nope.safetensors"),
    ("train-lora/model-unreadable", "train lora " + T + " --model {unreadable}"),
    ("train-lora/vae-missing", "train lora " + T + " --vae {root}/nope"),
    ("train-lora/vae-unreadable", "train lora " + T + " --vae {unreadable}"),
    ("train-lora/val-dir-missing", "train lora " + T + " --val-dir {root}/nope"),
    ("train-lora/val-dir-unreadable", "train lora " + T + " --val-dir {unreadable_dir}"),
    ("train-lora/resume-missing", "train lora " + T + " --resume {root}/nope"),
    ("train-lora/config-missing", "train lora " + T + " --config {root}/nope.toml"),
    ("train-lora/config-folder", "train lora " + T + " --config {empty_dir}"),
    ("train-lora/config-empty-but-no-data", "train lora --out {out} --config {empty_toml}"),
    ("train-lora/config-garbage", "train lora " + T + " --config {garbage_bin}"),
    ("train-lora/config-bad-toml", "train lora " + T + " --config {bad_toml}"),
    ("train-lora/config-other-method", "train lora " + T + " --config {ti_toml}"),
    ("train-lora/config-negative-steps", "train lora " + T + " --config {neg_toml}"),
    ("train-lora/config-unknown-key", "train lora " + T + " --config {unknown_toml}"),
    ("train-lora/config-latin1", "train lora " + T + " --config {latin1_toml}"),
    ("train-lora/config-unreadable", "train lora " + T + " --config {unreadable}"),
    # -- train: names, encodings
    ("train-lora/output-name-slash", "train lora " + T + " --output-name a/b"),
    ("train-lora/output-name-dots", "train lora " + T + " --output-name .."),
    ("train-lora/output-name-reserved", "train lora " + T + " --output-name state"),
    ("train-lora/output-name-invalid-utf8", ["train", "lora", "--data", "{data}", "--out", "{out}", "--output-name",
                                             BAD_UTF8]),
    ("train-lora/sample-prompt-invalid-utf8", ["train", "lora", "--data", "{data}", "--out", "{out}",
                                               "--sample-every", "2", "--sample-prompt", BAD_UTF8]),
    # -- train lora --pivotal (pivotal tuning): checked before the model loads
    ("train-lora/pivotal-tokens-zero", "train lora " + T + " --pivotal --pivotal-tokens 0"),
    ("train-lora/pivotal-tokens-huge", "train lora " + T + " --pivotal --pivotal-tokens 17"),
    ("train-lora/pivotal-frac-zero", "train lora " + T + " --pivotal --pivotal-frac 0"),
    ("train-lora/pivotal-frac-above-1", "train lora " + T + " --pivotal --pivotal-frac 1.5"),
    ("train-lora/pivotal-frac-nan", "train lora " + T + " --pivotal --pivotal-frac nan"),
    ("train-lora/pivotal-lr-negative", "train lora " + T + " --pivotal --pivotal-lr -1e-3"),
    ("train-lora/pivotal-token-with-space", "train lora " + T + " --pivotal --pivotal-token 'my word'"),
    ("train-lora/pivotal-token-brackets", "train lora " + T + " --pivotal --pivotal-token '(w)'"),
    ("train-lora/pivotal-token-without-pivotal", "train lora " + T + " --pivotal-token '<w>'"),
    ("train-lora/pivotal-token-is-abstraction", "train lora " + T + " --pivotal --pivotal-token sks "
     "--pivotal-abstraction sks"),
    ("train-lora/pivotal-abstraction-two-words", "train lora " + T + " --pivotal --pivotal-abstraction 'a b'"),
    ("train-lora/pivotal-format-diffusers", "train lora " + T + " --pivotal --format diffusers"),
    ("train-lora/pivotal-prompt-without-word", "train lora " + T + " --pivotal --prompt 'a photo of a shape'"),
    ("train-ti/steps-negative", "train ti " + TI + " --steps -1"),
    ("train-ti/lr-nan", "train ti " + TI + " --lr nan"),
    ("train-ti/vectors-zero", "train ti " + TI + " --vectors 0"),
    ("train-ti/vectors-huge", "train ti " + TI + " --vectors 100000"),
    ("train-ti/token-with-space", "train ti " + T + " --token 'my token'"),
    ("train-ti/token-empty", "train ti " + T + " --token ''"),
    ("train-ti/token-invalid-utf8", ["train", "ti", "--data", "{data}", "--out", "{out}", "--token", BAD_UTF8]),
    ("train-ti/templates-missing", "train ti " + TI + " --templates {root}/nope.txt"),
    ("train-ti/data-unreadable", "train ti --data {unreadable_dir} --out {out} --token sks"),
    ("train-ti/out-read-only", "train ti --data {data} --out {ro_dir}/ti --token sks"),
    ("train-dreambooth/steps-text", "train dreambooth " + DB + " --steps x"),
    ("train-dreambooth/lr-inf", "train dreambooth " + DB + " --lr inf"),
    ("train-dreambooth/prior-weight-nan", "train dreambooth " + DB + " --prior-weight nan"),
    ("train-dreambooth/keep-base-negative", "train dreambooth " + DB + " --keep-base -1"),
    ("train-lora/keep-base-huge", "train lora " + T + " --keep-base 1e9"),
    ("train-dreambooth/num-class-images-negative", "train dreambooth " + DB + " --num-class-images -1"),
    ("train-dreambooth/class-data-missing", "train dreambooth " + DB + " --class-data {root}/nope"),
    ("train-dreambooth/identifier-two-words", "train dreambooth " + T + " --identifier 'a sks'"),
    ("train-dreambooth/data-unreadable", "train dreambooth --data {unreadable_dir} --out {out} --no-prior-preservation"),
    ("train-dreambooth/out-is-file", "train dreambooth --data {data} --out {afile} --no-prior-preservation"),
    ("train-hypernetwork/steps-zero", "train hypernetwork " + T + " --steps 0"),
    ("train-hypernetwork/layer-structure-bad", "train hypernetwork " + T + " --layer-structure 1,x,1"),
    ("train-hypernetwork/layer-structure-zero", "train hypernetwork " + T + " --layer-structure 1,0,1"),
    ("train-hypernetwork/min-strength-nan", "train hypernetwork " + T + " --min-strength nan"),
    ("train-hypernetwork/activation-unknown", "train hypernetwork " + T + " --activation wiggle"),
    ("train-hypernetwork/data-unreadable", "train hypernetwork --data {unreadable_dir} --out {out}"),
    ("train-hypernetwork/out-read-only", "train hypernetwork --data {data} --out {ro_dir}/hn"),
    ("train/unknown-method", "train loha " + T),
    # -- convert
    ("convert/missing", "convert {root}/nope.safetensors --to kohya --out {out}.safetensors"),
    ("convert/folder", "convert {empty_dir} --to kohya --out {out}.safetensors"),
    ("convert/empty", "convert {empty_safetensors} --to kohya --out {out}.safetensors"),
    ("convert/empty-ckpt", "convert {empty_ckpt} --to kohya --out {out}.safetensors"),
    ("convert/garbage", "convert {garbage_safetensors} --to kohya --out {out}.safetensors"),
    ("convert/garbage-pt", "convert {garbage_pt} --to kohya --out {out}.safetensors"),
    ("convert/truncated", "convert {truncated} --to kohya --out {out}.safetensors"),
    ("convert/huge-header", "convert {huge_header} --to kohya --out {out}.safetensors"),
    ("convert/nested-header", "convert {nested} --to kohya --out {out}.safetensors"),
    ("convert/pickle-with-code", "convert {evil_ckpt} --to kohya --out {out}.safetensors"),
    ("convert/zip-pickle-with-code", "convert {evil_pt} --to safetensors --out {out}.safetensors"),
    ("convert/wrong-kind", "convert {unknown_kind} --to kohya --out {out}.safetensors"),
    ("convert/text-file", "convert {text} --to kohya --out {out}.safetensors"),
    ("convert/png-without-embedding", "convert {png_plain} --to safetensors --out {out}.safetensors"),
    ("convert/unreadable", "convert {unreadable} --to kohya --out {out}.safetensors"),
    ("convert/symlink-loop", "convert {loop} --to kohya --out {out}.safetensors"),
    ("convert/out-exists", "convert {unknown_kind} --to kohya --out {afile}"),
    ("convert/out-read-only", "convert {unknown_kind} --to kohya --out {ro_dir}/x.safetensors"),
    ("convert/out-under-file", "convert {unknown_kind} --to kohya --out {afile}/x.safetensors"),
    ("convert/target-unknown", "convert {unknown_kind} --to ckpt --out {out}.safetensors"),
    ("convert/dtype-unknown", "convert {unknown_kind} --to kohya --dtype fp4 --out {out}.safetensors"),
    ("convert/no-out", "convert {unknown_kind} --to kohya"),
    # -- merge
    ("merge/no-lora", "merge --out {out}.safetensors"),
    ("merge/lora-missing", "merge --lora {root}/nope.safetensors --out {out}.safetensors"),
    ("merge/lora-folder", "merge --lora {empty_dir} --out {out}.safetensors"),
    ("merge/lora-unreadable", "merge --lora {unreadable} --out {out}.safetensors"),
    ("merge/lora-weight-text", "merge --lora {unknown_kind}:heavy --out {out}.safetensors"),
    ("merge/lora-weight-inf", "merge --lora {unknown_kind}:inf --out {out}.safetensors"),
    ("merge/model-unreadable", "merge --model {unreadable} --lora {unknown_kind} --out {out}.safetensors"),
    ("merge/out-exists", "merge --lora {unknown_kind} --out {afile}"),
    ("merge/out-wrong-extension", "merge --lora {unknown_kind} --out {out}.ckpt"),
    ("merge/out-read-only", "merge --lora {unknown_kind} --out {ro_dir}/m.safetensors"),
    ("merge/out-folder-read-only", "merge --lora {unknown_kind} --out {ro_dir}/m"),
    ("merge/out-nul", ["merge", "--lora", "{unknown_kind}", "--out", "m\0.safetensors"]),
    ("merge/dtype-unknown", "merge --lora {unknown_kind} --out {out}.safetensors --dtype fp8"),
    # -- info
    ("info/missing", "info {root}/nope.safetensors"),
    ("info/empty", "info {empty_safetensors}"),
    ("info/empty-ckpt", "info {empty_ckpt}"),
    ("info/garbage", "info {garbage_safetensors}"),
    ("info/garbage-ckpt", "info {garbage_ckpt}"),
    ("info/truncated", "info {truncated}"),
    ("info/huge-header", "info {huge_header}"),
    ("info/nested-header", "info {nested}"),
    ("info/pickle-with-code", "info {evil_ckpt}"),
    ("info/zip-pickle-with-code", "info {evil_pt} --keys"),
    ("info/text-file", "info {text}"),
    ("info/empty-folder", "info {empty_dir}"),
    ("info/unreadable", "info {unreadable}"),
    ("info/unreadable-folder", "info {unreadable_dir}"),
    ("info/symlink-loop", "info {loop}"),
    ("info/nul", ["info", "a\0b.safetensors"]),
    ("info/name-too-long", "info {root}/" + LONG_NAME + ".safetensors"),
    ("info/invalid-utf8-name", ["info", BAD_UTF8 + ".safetensors"]),
    # -- prompt explain
    ("prompt/steps-zero", "prompt explain 'a cat' --steps 0"),
    ("prompt/steps-text", "prompt explain 'a cat' --steps x"),
    ("prompt/model-missing", "prompt explain 'a cat' --model {root}/nope"),
    ("prompt/model-empty-folder", "prompt explain 'a cat' --model {empty_dir}"),
    ("prompt/model-unreadable", "prompt explain 'a cat' --model {unreadable_dir}"),
    ("prompt/syntax-unknown", "prompt explain 'a cat' --prompt-syntax xml"),
    ("prompt/emphasis-unknown", "prompt explain 'a cat' --emphasis loud"),
    ("prompt/invalid-utf8", ["prompt", "explain", BAD_UTF8]),
    ("prompt/negative-invalid-utf8", ["prompt", "explain", "a cat", "--negative", BAD_UTF8]),
    ("prompt/no-text", "prompt explain"),
    # -- dataset check
    ("dataset/missing", "dataset check {root}/nope"),
    ("dataset/file", "dataset check {afile}"),
    ("dataset/empty", "dataset check {empty_dir}"),
    ("dataset/unreadable", "dataset check {unreadable_dir}"),
    ("dataset/image-unreadable", "dataset check {data_unreadable_image}"),
    ("dataset/resolution-zero", "dataset check {data} --resolution 0"),
    ("dataset/resolution-text", "dataset check {data} --resolution big"),
    ("dataset/method-unknown", "dataset check {data} --method gan"),
    ("dataset/nul", ["dataset", "check", "da\0ta"]),
    # -- toy
    ("toy-dataset/out-is-file", "toy dataset --out {afile}"),
    ("toy-dataset/out-read-only", "toy dataset --out {ro_dir}/set"),
    ("toy-dataset/out-not-empty", "toy dataset --out {data}"),
    ("toy-dataset/out-nul", ["toy", "dataset", "--out", "s\0et"]),
    ("toy-dataset/count-zero", "toy dataset --out {out} -n 0"),
    ("toy-dataset/count-huge", "toy dataset --out {out} -n 10000000"),
    ("toy-dataset/count-text", "toy dataset --out {out} -n some"),
    ("toy-dataset/shape-unknown", "toy dataset --out {out} --shape blob"),
    ("toy-dataset/colour-unknown", "toy dataset --out {out} --colour mauve"),
    ("toy-dataset/caption-bad-field", "toy dataset --out {out} --caption '{{size}}'"),
    ("toy-dataset/caption-invalid-utf8", ["toy", "dataset", "--out", "{out}", "--caption", BAD_UTF8]),
    ("toy-dataset/seed-text", "toy dataset --out {out} --seed s"),
    ("toy-judge/missing", "toy judge {root}/nope.png"),
    ("toy-judge/folder", "toy judge {empty_dir}"),
    ("toy-judge/empty", "toy judge {empty_png}"),
    ("toy-judge/garbage", "toy judge {garbage_png}"),
    ("toy-judge/unreadable", "toy judge {unreadable_png}"),
    ("toy-judge/none", "toy judge"),
    ("toy-eval/seeds-zero", "toy eval --seeds 0"),
    ("toy-eval/steps-negative", "toy eval --steps -1"),
    ("toy-eval/cfg-nan", "toy eval --cfg nan --out {out}"),
    ("toy-eval/shapes-unknown", "toy eval --shapes blob"),
    ("toy-eval/out-read-only", "toy eval --out {ro_dir}/eval"),
    ("toy-eval/out-is-file", "toy eval --out {afile}"),
    # -- ui (options only: no server starts)
    ("ui/port-zero", "ui --port 0"),
    ("ui/port-huge", "ui --port 70000"),
    ("ui/port-text", "ui --port http"),
    ("ui/auth-no-colon", "ui --auth me"),
    ("ui/auth-empty-password", "ui --auth me:"),
    ("ui/ckpt-dir-missing", "ui --ckpt-dir {root}/nope"),
    ("ui/ckpt-dir-file", "ui --ckpt-dir {afile}"),
    ("ui/lora-dir-unreadable", "ui --lora-dir {unreadable_dir}"),
    ("ui/data-dir-missing", "ui --data-dir {root}/nope"),
    ("ui/outputs-file", "ui --outputs {afile}"),
    ("ui/outputs-read-only", "ui --outputs {ro_dir}/o"),
    ("ui/runs-read-only", "ui --runs {ro_dir}/r"),
    ("ui/datasets-missing", "ui --datasets {root}/nope"),
    ("ui/datasets-unreadable", "ui --datasets {unreadable_dir}"),
    # -- recipe wrong-lora (validation only: every row fails before a model loads)
    ("recipe/images-zero", "recipe wrong-lora --out {out} --images 0"),
    ("recipe/images-huge", "recipe wrong-lora --out {out} --images 99999999"),
    ("recipe/cfg-one", "recipe wrong-lora --out {out} --cfg 1"),
    ("recipe/cfg-nan", "recipe wrong-lora --out {out} --cfg nan"),
    ("recipe/trigger-spaces", ["recipe", "wrong-lora", "--out", "{out}", "--trigger", "two words"]),
    ("recipe/out-is-file", "recipe wrong-lora --out {afile}"),
    ("recipe/out-read-only", "recipe wrong-lora --out {ro_dir}/wrong"),
    ("recipe/subjects-missing", "recipe wrong-lora --out {out} --subjects {root}/nope.txt"),
    ("recipe/bad-weight-huge", "recipe wrong-lora --out {out} --bad-weight 100"),
    # -- demo (validation only)
    ("demo/steps-zero", "demo --steps 0 --out {out}"),
    ("demo/steps-huge", "demo --steps 100000 --out {out}"),
    ("demo/steps-text", "demo --steps x --out {out}"),
    ("demo/out-is-file", "demo --out {afile}"),
    ("demo/out-read-only", "demo --out {ro_dir}/demo"),
    ("demo/model-missing", "demo --model {root}/nope --out {out}"),
    # -- the command line itself
    ("cli/unknown-command", "paint x"),
    ("cli/unknown-group-command", "toy paint"),
]
# rows whose bad input can only be seen by opening the model (its files are not a model)
LOADS = {"train-lora/data-garbage-images", "generate/model-empty-dir", "generate/model-text-file"}


def _argv(row: str | list[str], names: dict[str, str]) -> list[str]:
    args = shlex.split(row) if isinstance(row, str) else list(row)
    return [a.format(**names) for a in args]


@pytest.mark.parametrize("case,row", CASES, ids=[c for c, _ in CASES])
def test_bad_input_row(case: str, row: str | list[str], inputs: dict[str, str], tmp_path: Path, capsys: Any,
                       monkeypatch: Any) -> None:
    import sdtune.paths
    import uvicorn

    real_access = os.access

    def access(path: Any, mode: int) -> bool:
        text = str(path)
        if "unreadable" in text and mode & os.R_OK:
            return False
        if "ro_dir" in text and mode & os.W_OK:
            return False
        return real_access(path, mode)

    def serve(*args: Any, **kwargs: Any) -> None:
        raise ServerStarted(case)

    monkeypatch.setattr(sdtune.paths, "access", access)
    monkeypatch.setattr(uvicorn, "run", serve)
    if case not in LOADS:
        import sdtune.models
        import sdtune.models.loading

        monkeypatch.setattr(sdtune.models, "load_model", _no_loading)
        monkeypatch.setattr(sdtune.models.loading, "load_model", _no_loading)
    monkeypatch.chdir(tmp_path)  # relative paths in rows land here
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    names = dict(inputs, out=str(outdir / "out"), outdir=str(outdir))
    root = Path(inputs["root"])
    before = _snapshot(root, tmp_path)
    code, _, err = run_cli(_argv(row, names), capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert _snapshot(root, tmp_path) == before, "files changed"


def _command_of(row: str | list[str]) -> tuple[str, ...]:
    """The (sub)command words a row runs, e.g. ("train", "lora")."""
    from sdtune.cli import cli

    args = shlex.split(row) if isinstance(row, str) else list(row)
    group: Any = cli
    words: list[str] = []
    for word in args:
        sub = getattr(group, "commands", {}).get(word)
        if sub is None:
            break
        words.append(word)
        group = sub
    return tuple(words)


def test_the_table_covers_every_subcommand() -> None:
    """Every command and subcommand has rows (build-tiny excepted: the maintainers' trainer, its own argparse)."""
    from sdtune.cli import _register, cli

    _register()
    wanted = set()
    for name, command in cli.commands.items():
        subs = getattr(command, "commands", None)
        wanted |= {(name,)} if subs is None else {(name, sub) for sub in subs if sub != "build-tiny"}
    counts: dict[tuple[str, ...], int] = {}
    for _, row in CASES:
        words = _command_of(row)
        counts[words] = counts.get(words, 0) + 1
    assert wanted <= set(counts), sorted(wanted - set(counts))
    assert all(counts[w] >= 5 for w in wanted), {w: counts[w] for w in wanted}
    assert len(CASES) >= 150


# -- the real entry point, real refusals ------------------------------------------------------------------------

def _sdtune(args: list[str], cwd: Path, fsize: int | None = None, script: str | None = None) -> tuple[int, str]:
    """Run `python -m sdtune ARGS` (or `script`) in a subprocess; `fsize` caps the size of any file it writes
    (RLIMIT_FSIZE, with SIGXFSZ ignored: writes past it fail with EFBIG, as on a full disk)."""
    import resource
    import signal

    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "sdtune", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    return r.returncode, r.stderr


def _one_line(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for word in words:
        assert word in lines[0], (word, err)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs, which refuses writes even to root")
def test_real_output_folder_refused_even_to_root(tmp_path: Path) -> None:
    """sysfs refuses new files to everyone, root included, while os.access says yes: the real probe catches it
    before anything loads (generate used to fail only when saving, after generating)."""
    code, err = _sdtune(["generate", "x", "--out", "/sys/sdtune-out"], tmp_path)
    _one_line(code, err, "/sys/sdtune-out", "not writable")


def _unreadable_file(tmp_path: Path) -> Path | None:
    if os.geteuid() != 0:
        p = tmp_path / "mode000.safetensors"
        p.write_bytes(b"x")
        p.chmod(0)
        return p
    p = Path("/sys/bus/pci/rescan")  # write-only, even to root
    return p if p.exists() else None


def test_real_unreadable_input(tmp_path: Path) -> None:
    path = _unreadable_file(tmp_path)
    if path is None:
        pytest.skip("running as root without a write-only sysfs file: no file is unreadable here")
    code, err = _sdtune(["info", str(path)], tmp_path)
    _one_line(code, err, str(path), "permission denied")


def test_real_full_disk_toy_dataset(tmp_path: Path) -> None:
    """Each toy PNG is larger than the limit: one line, and no partial (or zero-byte) PNG is left."""
    code, err = _sdtune(["toy", "dataset", "--out", "set", "-n", "3"], tmp_path, fsize=200)
    _one_line(code, err, "no space left writing", "0000.png", "choose another --out")
    assert list((tmp_path / "set").iterdir()) == []


SAVE_SCRIPT = """
import sys, torch
from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import save_safetensors_atomic
from sdtune.training.checkpoint import StateStore, TrainState
save_safetensors_atomic({"w": torch.zeros(1000)}, "small.safetensors")  # 4 KB: fits
for what, save in (("file", lambda: save_safetensors_atomic({"w": torch.zeros(100_000)}, "small.safetensors")),
                   ("state", lambda: StateStore(__import__("pathlib").Path("state")).save(TrainState(
                       step=2, epoch=0, cursor=0, weights={"w": torch.zeros(100_000)}, optimizer={}, rng={},
                       history={}, config={}, extra={})))):
    try:
        save()
    except SdtuneError as exc:
        print(what, exc, file=sys.stderr)
"""


def test_real_full_disk_safetensors_and_training_state(tmp_path: Path) -> None:
    """safetensors reports EFBIG as its own error type; both the atomic writer (LoRA checkpoints, results) and the
    training state store turn it into the one message, remove their temp files and keep the last good file."""
    code, err = _sdtune([], tmp_path, fsize=64_000, script=SAVE_SCRIPT)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("file no space left writing small.safetensors: free space or choose another --out")
    assert lines[1].startswith("state no space left writing state/step-000002"), err
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "small.safetensors"))["w"].numel() == 1000  # the last good file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors", "state"]
    assert [p.name for p in (tmp_path / "state").iterdir()] == []  # no half-written state folder


def test_generate_full_disk_keeps_earlier_images_and_no_partial_one(tmp_path: Path, monkeypatch: Any) -> None:
    """generate/output.py writes a temp file, then links it to the first free number: a full disk on the second
    image is one SdtuneError; the first image stays, no temp file and no partial PNG remain."""
    import errno

    from sdtune.errors import SdtuneError
    from sdtune.generate.output import save_image

    img = Image.new("RGB", (8, 8))
    first = save_image(img, tmp_path, 1, "a cat")
    real_save = Image.Image.save

    def full(self: Any, fp: Any, *args: Any, **kwargs: Any) -> None:
        real_save(self, fp, *args, **kwargs)  # write something, then fail as a full disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SdtuneError, match=r"^no space left writing .*: free space or choose another --out$"):
        save_image(img, tmp_path, 2, "a cat")
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_generated_names_stay_exclusive(tmp_path: Path) -> None:
    """Two images saved into one folder never share a number, also when the folder was filled meanwhile."""
    from sdtune.generate.output import save_image

    img = Image.new("RGB", (8, 8))
    a = save_image(img, tmp_path, 5, None)
    (tmp_path / "00001-9.png").write_bytes(b"someone else's")
    b = save_image(img, tmp_path, 6, None)
    assert (a.name, b.name) == ("00000-5.png", "00002-6.png")
    assert (tmp_path / "00001-9.png").read_bytes() == b"someone else's"
