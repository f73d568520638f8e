"""`sdtune train ti`: what trains (only the n x width vectors), determinism, SDXL's two parts and EOS pooling,
initial vectors, templates, files and metadata, sampling with the token, and bad input caught before training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sdtune.adapters.textual_inversion import read_embedding
from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, train
from sdtune.training.methods.textual_inversion import (TIOptions, TextualInversionMethod, fill, init_vectors,
                                                       load_templates)
from sdtune.toy.testing import write_toy_dataset
from sdtune.training.testing import tiny_loaded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tidata")
    write_toy_dataset(d, 3, size=32, shapes=("star",), caption="a {colour} [name] on a white background")
    return d


def cfg(tmp_path, data, name="out", ti=None, **kw):
    base = dict(method="ti", data=str(data), out=str(tmp_path / name), steps=4, lr=5e-3, resolution=32,
                save_every=2, progress=False, tensorboard=False,
                options=TIOptions(**{"token": "<star>", "init": "shape", "vectors": 2, **(ti or {})}))
    base.update(kw)
    return TrainConfig(**base)


def quiet(**kw):
    return dict(echo=lambda s: None, **kw)


def test_only_the_vectors_train_and_runs_repeat(tmp_path, data, sd1):
    model = copy.deepcopy(sd1)
    before = {k: v.clone() for k, v in model.pipe.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
    method = TextualInversionMethod(TIOptions(token="<star>", init="shape", vectors=2))
    seen = []
    r = train(cfg(tmp_path, data, "a", flip=0.5, batch_size=2, grad_accum=2), model=model, method=method,
              on_step=lambda t, s, loss: seen.append(sum(v.numel() for st in t.optimizer.state.values()
                                                         for v in st.values() if torch.is_tensor(v)
                                                         and v.ndim > 0)),
              **quiet())
    assert len(r.losses) == 4 and all(math.isfinite(x) for x in r.losses)
    # optimizer state: exp_avg and exp_avg_sq of a 2 x 64 tensor, nothing for the vocabulary
    assert seen[-1] == 2 * 2 * 64
    for k, v in model.pipe.text_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in model.pipe.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    assert r.final.name == "star.safetensors"
    emb = read_embedding(r.final)
    assert emb.token == "<star>" and emb.vectors["*"].shape == (2, 64)
    start = init_vectors(model.pipe.text_encoder.get_input_embeddings().weight.detach()[
        model.pipe.tokenizer.convert_tokens_to_ids(["shape</w>"])], 2)
    assert not torch.allclose(emb.vectors["*"], start)
    meta = emb.metadata
    for key in ("sdtune_ti_token", "sdtune_ti_vectors", "sdtune_steps", "sdtune_base_model_hash", "sdtune_family",
                "sdtune_ti_init", "sdtune_dataset_hash", "sdtune_version", "sdtune_step"):
        assert meta.get(key), key
    assert (tmp_path / "a" / "checkpoints").is_dir()
    b = train(cfg(tmp_path, data, "b", flip=0.5, batch_size=2, grad_accum=2), model=copy.deepcopy(sd1), **quiet())
    assert b.losses == r.losses
    assert torch.equal(read_embedding(b.final).vectors["*"], emb.vectors["*"])


def test_sdxl_learns_clip_l_and_clip_g_and_pools_at_eos(tmp_path, data):
    from sdtune.prompts.encoder import encoder_slots

    model = tiny_loaded("sdxl")
    method = TextualInversionMethod(TIOptions(token="<star>", init="shape", vectors=2))
    r = train(cfg(tmp_path, data, "xl"), model=model, method=method, **quiet())
    emb = read_embedding(r.final)
    assert emb.is_sdxl() and emb.vectors["clip_l"].shape == (2, 64) and emb.vectors["clip_g"].shape == (2, 64)
    # pooled vector: taken at EOS, not at the token's positions
    slot = encoder_slots(model.pipe)[1]
    hidden, pooled = method.conditioner._run(slot, [_ids(slot.tokenizer, method)], [_chunk(slot.tokenizer, method)])
    te = slot.model
    with torch.no_grad():
        ids = torch.tensor([_ids(slot.tokenizer, method)])
        eos = int((ids[0] == slot.tokenizer.eos_token_id).nonzero()[0])
        out = _run_hidden(method, slot)
        want = te.text_projection(out[0, eos])
    assert torch.allclose(pooled[0], want, atol=1e-5)


def _chunk(tok, method):
    from sdtune.prompts.fragments import Fragment
    from sdtune.prompts.tokens import chunk_tokens

    return chunk_tokens((Fragment("a photo of <star>"),), tok, method.registry)[0]


def _ids(tok, method):
    from sdtune.prompts.tokens import chunk_ids

    return chunk_ids(_chunk(tok, method), tok)[0]


def _run_hidden(method, slot):
    """The second encoder's final-layer-normed last hidden state with the vectors spliced in."""
    tok = slot.tokenizer
    ids = torch.tensor([_ids(tok, method)])
    chunk = _chunk(tok, method)
    cols = [c + 1 for c, t in enumerate(chunk) if t.embedding]
    vecs = method.params[slot.key].detach()

    def hook(m, a, out):
        out = out.clone()
        out[0, cols] = vecs
        return out

    h = slot.model.get_input_embeddings().register_forward_hook(hook)
    try:
        return slot.model(ids, output_hidden_states=True).last_hidden_state
    finally:
        h.remove()


def test_init_vectors_average_cycle_and_group():
    rows = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(init_vectors(rows, 1), rows.mean(0, keepdim=True))
    assert torch.equal(init_vectors(rows, 5), rows[[0, 1, 2, 0, 1]])
    assert torch.equal(init_vectors(rows, 2), torch.stack([rows[:2].mean(0), rows[2]]))


def test_templates_and_filewords(tmp_path):
    assert "a photo of a [name]" in load_templates("object") and load_templates("filewords") == ["[filewords]"]
    assert fill("a photo of [name], [filewords]", "a red [name] on gray", "<s>") == "a photo of <s>, a red <s> on gray"
    f = tmp_path / "t.txt"
    f.write_text("# mine\na drawing of {}\n\n")
    assert load_templates(str(f)) == ["a drawing of [name]"]
    f.write_text("no token here\n")
    with pytest.raises(SdtuneError, match="never be trained"):
        load_templates(str(f))
    with pytest.raises(SdtuneError, match="neither a built-in"):
        load_templates("nosuch")


def test_filewords_prompts_and_samples_use_the_token(tmp_path, data, sd1):
    method = TextualInversionMethod(TIOptions(token="<star>", init="shape red", vectors=1, templates="filewords"))
    r = train(cfg(tmp_path, data, "fw", steps=2, save_every=0, sample_every=2,
                  sample_prompts=["a photo of <star>"], sample_seeds=[1, 2], sample_steps=2),
              model=copy.deepcopy(sd1), method=method, **quiet())
    assert all("<star>" in p and "[name]" not in p for p in method.last_prompts)
    assert len(list((tmp_path / "fw" / "samples").glob("*.png"))) == 1 and r.final.exists()


@pytest.mark.parametrize("fmt,ext", [("a1111", ".pt"), ("png", ".png"), ("diffusers", ".safetensors")])
def test_format_option_writes_that_layout(tmp_path, data, sd1, fmt, ext):
    r = train(cfg(tmp_path, data, fmt, steps=1, ti={"format": fmt}), model=copy.deepcopy(sd1), **quiet())
    assert r.final.suffix == ext and read_embedding(r.final).vectors["*"].shape == (2, 64)


def test_evaluator_sees_the_embedding(tmp_path, data, sd1):
    seen = {}

    def evaluator(ctx):
        imgs = ctx.generate(["a photo of <star>", "a photo of shape"], [1])
        seen["n"] = len(imgs)
        return {"ok": 1.0}

    train(cfg(tmp_path, data, "ev", steps=2, save_every=2, sample_steps=2), model=copy.deepcopy(sd1),
          evaluator=evaluator, **quiet())
    assert seen["n"] == 2


# ------------------------------------------------------------------------------------------------ bad input

def _train_args(model, data, out, *extra):
    return ["train", "ti", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "1",
            "--resolution", "64", "--no-progress", "--no-tensorboard", "--token", "<star>", "--init", "shape",
            *extra]


def test_cli_trains_and_bad_input_is_one_line(tmp_path, capsys, tiny_random_dir):
    from PIL import Image

    good = write_toy_dataset(tmp_path / "good", 3, size=64, shapes=("star",))
    code, out, err = run_cli(_train_args(tiny_random_dir, good, tmp_path / "o1", "--vectors", "2"), capsys)
    assert code == 0, err
    assert (tmp_path / "o1" / "star.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    one = write_toy_dataset(tmp_path / "one", 1, size=64)
    bad = write_toy_dataset(tmp_path / "bad", 2, size=64)
    (bad / "000.png").write_bytes((bad / "000.png").read_bytes()[:60])  # truncated
    notimg = tmp_path / "notimg"
    notimg.mkdir()
    (notimg / "a.txt").write_text("x")
    (notimg / "b.pdf").write_bytes(b"%PDF")
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGBA", (80, 64), (255, 0, 0, 128)).save(odd / "rgba.png")
    Image.new("L", (64, 64), 100).save(odd / "gray.png")
    Image.new("I;16", (64, 64), 30000).save(odd / "deep.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    Image.new("RGB", (4000, 3000), (200, 0, 0)).save(odd / "huge.jpg")
    ro = tmp_path / "afile"
    ro.write_text("a file where a folder is needed")  # (a read-only folder does not stop root)
    cases = [
        (_train_args(tiny_random_dir, empty, tmp_path / "e1"), "empty"),
        (_train_args(tiny_random_dir, bad, tmp_path / "e2"), "unreadable"),
        (_train_args(tiny_random_dir, notimg, tmp_path / "e3"), "no images"),
        (_train_args(tiny_random_dir, good, tmp_path / "e4")[:-4] + ["--token", "star", "--init", "shape"],
         "already exists in the vocabulary"),
        (_train_args(tiny_random_dir, good, tmp_path / "e5")[:-2] + ["--init", "xyzzyq"], "not in the vocabulary"),
        (_train_args(tiny_random_dir, good, ro / "out"), "not writable"),
        (_train_args(tiny_random_dir, good, tmp_path / "e7", "--vectors", "0"), "vectors 0"),
        (_train_args(tiny_random_dir, good, tmp_path / "e8", "--templates", "nope"), "neither a built-in"),
        (_train_args(tiny_random_dir, good, tmp_path / "e9")[:-4], "no token"),
        (_train_args(tiny_random_dir, good, tmp_path / "e10")[:-4] + ["--token", "my star", "--init", "shape"],
         "one word"),
    ]
    for args, msg in cases:
        code, out, err = run_cli(args, capsys)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code != 0 and len(lines) == 1 and msg in lines[0], (msg, err)
        out_dir = args[args.index("--out") + 1]
        assert not list((tmp_path / out_dir).glob("checkpoints/*")) if (tmp_path / out_dir).exists() else True
    code, out, err = run_cli(_train_args(tiny_random_dir, good, tmp_path / "f", "--force")[:-6] +
                             ["--token", "star", "--init", "shape", "--force"], capsys)
    assert code == 0, err
    code, out, err = run_cli(_train_args(tiny_random_dir, one, tmp_path / "w1"), capsys)
    assert code == 0 and "only 1 image" in err
    code, out, err = run_cli(_train_args(tiny_random_dir, odd, tmp_path / "w2"), capsys)
    assert code == 0, err


def test_resume_continues_exactly(tmp_path, data, sd1):
    full = train(cfg(tmp_path, data, "full", steps=4, save_every=2), model=copy.deepcopy(sd1), **quiet())
    part = cfg(tmp_path, data, "part", steps=2, save_every=2)
    train(part, model=copy.deepcopy(sd1), **quiet())
    rest = train(part.replace(steps=4, resume="auto"), model=copy.deepcopy(sd1), **quiet())
    assert rest.losses == full.losses[2:]
    assert torch.equal(read_embedding(rest.final).vectors["*"], read_embedding(full.final).vectors["*"])


def test_sd2_v_prediction_trains(tmp_path, data):
    r = train(cfg(tmp_path, data, "sd2", steps=2, save_every=0), model=tiny_loaded("sd2"), **quiet())
    assert all(math.isfinite(x) for x in r.losses) and read_embedding(r.final).vectors["*"].shape == (2, 64)
