"""The shared training loop on tiny random models: determinism, exact resume, the NaN guard, fixed-noise
validation, early stopping and best-checkpoint selection, summaries, samples, and a toy overfit."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, Trainer, TrainingDiverged, train
from sdtune.training.checkpoint import StateStore
from sdtune.training.runlog import read_log, step_losses
from sdtune.toy.testing import write_toy_dataset
from sdtune.training.testing import tiny_loaded


@pytest.fixture(scope="module")
def pristine():
    return tiny_loaded("sd1")


@pytest.fixture
def model(pristine):
    return copy.deepcopy(pristine)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_toy_dataset(d, 4, size=32)
    (d / "000.txt").write_text("a red circle, white background, sks, solid")  # tags for the caption augmentations
    return d


def config(tmp_path, data, name="out", **kw):
    base = dict(method="lora", data=str(data), out=str(tmp_path / name), steps=6, lr=1e-3, resolution=32,
                save_every=3, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def quiet(**kw):
    return dict(echo=lambda s: None, **kw)


# ------------------------------------------------------------------------------------------------ determinism

def test_same_seed_gives_the_same_loss_sequence(tmp_path, data, pristine):
    kw = dict(steps=5, save_every=0, flip=0.5, shuffle_tags=True, tag_dropout=0.2, batch_size=2, grad_accum=2,
              lr_scheduler="cosine", warmup_steps=1)
    a = train(config(tmp_path, data, "a", **kw), model=copy.deepcopy(pristine), **quiet())
    b = train(config(tmp_path, data, "b", **kw), model=copy.deepcopy(pristine), **quiet())
    c = train(config(tmp_path, data, "c", seed=1, **kw), model=copy.deepcopy(pristine), **quiet())
    assert len(a.losses) == 5 and all(math.isfinite(x) for x in a.losses)
    assert a.losses == b.losses
    assert a.losses != c.losses
    assert step_losses(a.log) == a.losses
    lrs = [r["lr"] for r in read_log(a.log) if r["event"] == "step"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # warm-up 1, cosine to 0
    assert load_file(a.final) .keys() == load_file(b.final).keys()
    assert all(torch.equal(load_file(a.final)[k], load_file(b.final)[k]) for k in load_file(a.final))


# ------------------------------------------------------------------------------------------------ resume

def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, data, pristine):
    # LoRA dropout draws from torch's global RNG, so this also checks that RNG states are saved and restored.
    kw = dict(steps=6, save_every=2, val_split=0.25, flip=0.5, shuffle_tags=True, lr_scheduler="cosine",
              warmup_steps=2, grad_accum=2)
    full_cfg = config(tmp_path, data, "full", **kw)
    full_cfg.options.dropout = 0.1
    full = train(full_cfg, model=copy.deepcopy(pristine), **quiet())

    def stop_at_3(trainer, step, loss):
        if step == 3:
            trainer.request_stop()

    part_cfg = config(tmp_path, data, "part", **kw)
    part_cfg.options.dropout = 0.1
    first = train(part_cfg, model=copy.deepcopy(pristine), on_step=stop_at_3, **quiet())
    assert first.stopped == "interrupted" and first.step == 3 and first.final is None
    assert StateStore(tmp_path / "part" / "state").load().step == 3
    with pytest.raises(SdtuneError, match="already holds a training run"):
        train(part_cfg, model=copy.deepcopy(pristine), **quiet())
    second = train(part_cfg.replace(resume="auto"), model=copy.deepcopy(pristine), **quiet())
    assert second.stopped == "finished" and second.losses == full.losses[3:]
    assert step_losses(second.log) == full.losses  # the log reads as one run
    assert [r["val_loss"] for r in second.rows] == [r["val_loss"] for r in full.rows]
    a, b = load_file(full.final), load_file(second.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_with_more_steps(tmp_path, data, pristine):
    full = train(config(tmp_path, data, "full", steps=6), model=copy.deepcopy(pristine), **quiet())
    short = config(tmp_path, data, "short", steps=3)
    train(short, model=copy.deepcopy(pristine), **quiet())
    more = train(short.replace(steps=6, resume="auto"), model=copy.deepcopy(pristine), **quiet())
    assert step_losses(more.log) == full.losses
    assert [r["step"] for r in more.rows] == [3, 6]


def test_a_resumed_run_logs_one_end_the_last_sessions(tmp_path, data, pristine):
    # Interrupted at 2 (an `end` with stopped=interrupted), extended once finished at 4 (an `end` with finished):
    # the log keeps one `end`, the last session's, after a `resume` per session, so readers see the run's state.
    from sdtune.training.runlog import run_outcome

    def stop_at_2(trainer, step, loss):
        if step == 2:
            trainer.request_stop()

    cfg = config(tmp_path, data, steps=4, save_every=2)
    assert train(cfg, model=copy.deepcopy(pristine), on_step=stop_at_2, **quiet()).stopped == "interrupted"
    assert run_outcome(read_log(tmp_path / "out" / "log.jsonl"))["stopped"] == "interrupted"
    train(cfg.replace(resume="auto"), model=copy.deepcopy(pristine), **quiet())
    train(cfg.replace(steps=5, resume="auto"), model=copy.deepcopy(pristine), **quiet())
    records = read_log(tmp_path / "out" / "log.jsonl")
    events = [(r["event"], r["step"]) for r in records if r["event"] not in ("step", "checkpoint")]
    assert events == [("start", 0), ("interrupted", 2), ("resume", 2), ("resume", 4), ("end", 5)]
    assert run_outcome(records) == records[-1] and records[-1]["stopped"] == "finished"
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4, 5]
    # a session still running (or killed) after a resume has no outcome yet, even in a log with an older `end`
    assert run_outcome(records + [{"event": "resume", "step": 5}]) is None


def test_kill_between_state_and_log_cuts_the_log_back(tmp_path, data, pristine):
    cfg = config(tmp_path, data, steps=4, save_every=2)
    train(cfg, model=copy.deepcopy(pristine), **quiet())
    # Pretend the process died after logging steps 5-6 but before saving their state: on resume the log is cut
    # back to the state's step (4), so it never holds a step twice.
    log = tmp_path / "out" / "log.jsonl"
    with open(log, "a") as f:
        f.write(json.dumps({"event": "step", "step": 5, "loss": 9.0, "lr": 0.0}) + "\n")
        f.write('{"event": "step", "step": 6, "lo')  # torn line
    r = train(cfg.replace(steps=5, resume="auto"), model=copy.deepcopy(pristine), **quiet())
    steps = [x["step"] for x in read_log(log) if x["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5] and 9.0 not in step_losses(log) and r.step == 5


# ------------------------------------------------------------------------------------------------ latents

def test_latents_auto_follows_the_model_marker(tmp_path, data, pristine):
    """--latents auto: posterior means for a model whose folder's sdtune.json says so (the bundled tiny model),
    samples otherwise; the run then equals one given that mode explicitly."""
    from sdtune.models import load_model
    from sdtune.training.latents import resolve_latents_mode

    assert resolve_latents_mode("auto", load_model("tiny")) == "mean"
    assert resolve_latents_mode("auto", pristine) == "sample"
    assert resolve_latents_mode("sample", load_model("tiny")) == "sample"
    marked = copy.deepcopy(pristine)
    marked.source = tmp_path / "marked"
    marked.source.mkdir()
    (marked.source / "sdtune.json").write_text('{"latents": "mean"}')
    said: list[str] = []
    auto = train(config(tmp_path, data, "auto", latents="auto", save_every=0), model=copy.deepcopy(marked),
                 echo=said.append)
    assert any("latents: posterior means" in s for s in said)
    mean = train(config(tmp_path, data, "mean", latents="mean", save_every=0), model=copy.deepcopy(pristine),
                 **quiet())
    sample = train(config(tmp_path, data, "sample", latents="auto", save_every=0), model=copy.deepcopy(pristine),
                   **quiet())
    assert auto.losses == mean.losses
    assert sample.losses != mean.losses
    (marked.source / "sdtune.json").write_text("not json")
    assert resolve_latents_mode("auto", marked) == "sample"


# ------------------------------------------------------------------------------------------------ NaN guard

def all_finite_files(out):
    files = list(out.rglob("*.safetensors"))
    assert files
    return all(all(torch.isfinite(t).all() for t in load_file(f).values() if t.is_floating_point()) for f in files)


def test_huge_learning_rate_rolls_back_and_never_saves_nan(tmp_path, data, model):
    cfg = config(tmp_path, data, steps=8, save_every=1, lr=1e12, max_grad_norm=0.0)  # step 1 saves, later overflow
    trainer = Trainer(cfg, model=model, **quiet())
    with pytest.raises(TrainingDiverged, match="the learning rate 1e[+]12 is far above .*leave --lr out") as e:
        trainer.run()  # not "try 1e+11": a tenth of an absurd rate is still absurd
    msg = str(e.value)
    assert "\n" not in msg and "rolled back" in msg
    assert all_finite_files(tmp_path / "out")
    good = StateStore(tmp_path / "out" / "state").load()
    live = trainer.method.state_dict()
    assert all(torch.equal(live[k], good.weights[k]) for k in live)  # the live weights are the last good ones
    assert trainer.step == good.step < 8
    events = [r for r in read_log(tmp_path / "out" / "log.jsonl") if r["event"] == "diverged"]
    assert len(events) == 1 and events[0]["rolled_back_to"] == good.step
    assert e.value.result is not None and e.value.result.stopped == "diverged"


def test_nan_from_the_model_rolls_back_to_the_initial_weights(tmp_path, data, model):
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] >= 3:  # the third UNet forward (step 3) returns NaN
            output.sample = torch.full_like(output.sample, float("nan"))
        return output

    model.pipe.unet.register_forward_hook(poison)
    before = {n: p.detach().clone() for n, p in model.pipe.unet.named_parameters() if n.endswith(".bias")}
    cfg = config(tmp_path, data, method="bias", steps=6, save_every=0)
    trainer = Trainer(cfg, model=model, **quiet())
    with pytest.raises(TrainingDiverged, match="step 3: non-finite loss; rolled back to the initial weights"):
        trainer.run()
    after = dict(model.pipe.unet.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # nothing was saved


# ------------------------------------------------------------------------------------------------ validation

def test_validation_loss_is_deterministic_and_leaves_training_rng_alone(tmp_path, data, model):
    cfg = config(tmp_path, data, val_split=0.5, val_timesteps=4)
    t = Trainer(cfg, model=model, **quiet())
    t.out = tmp_path / "out"
    t._prepare()
    assert len(t.val) == 2 and t.val.timesteps.tolist() == [50, 350, 650, 950]
    rng = torch.get_rng_state()
    v1, v2 = t.validation_loss(), t.validation_loss()
    assert v1 == v2 and math.isfinite(v1)
    assert torch.equal(rng, torch.get_rng_state())
    with torch.no_grad():  # a weight change changes it (LoRA B starts at zero: move every LoRA weight)
        for p in t.params:
            p.add_(0.05)
    assert t.validation_loss() != v1


def test_toy_overfit_lowers_the_validation_loss(tmp_path, pristine):
    d = write_toy_dataset(tmp_path / "two", 2, size=32)
    cfg = config(tmp_path, d, steps=30, lr=1e-2, save_every=10, val_dir=str(d), latents="mean", batch_size=2,
                 keep_checkpoints="all")
    r = train(cfg, model=copy.deepcopy(pristine), **quiet())
    baseline = next(x for x in read_log(r.log) if x["event"] == "baseline")["val_loss"]
    vals = [row["val_loss"] for row in r.rows]
    assert vals[-1] < 0.85 * baseline and vals == sorted(vals, reverse=True)
    assert r.best_step == 30 and r.final.read_bytes() == (tmp_path / "out" / r.rows[-1]["file"]).read_bytes()
    assert len(list((tmp_path / "out" / "checkpoints").iterdir())) == 3  # keep_checkpoints=all


def test_early_stopping_selects_the_best_checkpoint_and_writes_the_summary(tmp_path, data, model):
    scores = iter([0.5, 0.9, 0.7, 0.95, 0.6, 0.8, 0.99])
    seen = []

    def evaluator(ctx):
        seen.append(ctx.step)
        assert ctx.checkpoint.is_file()
        return {"score": next(scores)}

    cfg = config(tmp_path, data, method="bias", steps=20, save_every=2, early_stop="2,0.1", select_by="score")
    r = train(cfg, model=model, evaluator=evaluator, **quiet())
    # 0.5 best; 0.9 best (+0.4); 0.7 bad 1; 0.95 is only +0.05 (< min_delta 0.1): bad 2 -> stop at step 8
    assert r.stopped == "early_stop" and r.step == 8 and seen == [2, 4, 6, 8]
    assert r.best_step == 4
    out = tmp_path / "out"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["bias-000004.safetensors"]  # keep=best
    assert r.final == out / "bias.safetensors"
    assert r.final.read_bytes() == (out / "checkpoints" / "bias-000004.safetensors").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 4 and summary["select_by"] == "score" and summary["final"] == "bias.safetensors"
    assert [c["score"] for c in summary["checkpoints"]] == [0.5, 0.9, 0.7, 0.95]
    assert [c["best"] for c in summary["checkpoints"]] == [False, True, False, False]
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == "step,train_loss,val_loss,score,file,best" and len(csv_lines) == 5
    assert csv_lines[2].endswith("checkpoints/bias-000004.safetensors,True")
    assert StateStore(out / "state").load().step == 8  # the state is the last step, the result the best one


def test_early_stop_needs_something_to_measure(tmp_path, data, model):
    with pytest.raises(SdtuneError, match="early_stop needs a validation set"):
        train(config(tmp_path, data, early_stop="2"), model=model, **quiet())
    with pytest.raises(SdtuneError, match="needs an evaluator"):
        train(config(tmp_path, data, select_by="clip"), model=model, **quiet())


# ------------------------------------------------------------------------------------------------ outputs

def test_outputs_samples_and_lora_file(tmp_path, data, model):
    cfg = config(tmp_path, data, steps=4, save_every=2, keep_checkpoints="last", sample_every=2,
                 sample_prompts=["a red circle", "a blue square"], sample_seeds=[1, 2, 3], sample_steps=2,
                 output_name="heart")
    r = train(cfg, model=model, **quiet())
    out = tmp_path / "out"
    assert r.final == out / "heart.safetensors" and r.best_step == 4  # no validation: the last checkpoint
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["heart-000004.safetensors"]
    from PIL import Image

    grids = sorted((out / "samples").iterdir())
    assert [g.name for g in grids] == ["heart-000002.png", "heart-000004.png"]
    assert Image.open(grids[0]).size == (3 * 32, 2 * 32)  # 6 images: 3 columns x 2 rows of 32 px
    from sdtune.formats.safe_io import read_safetensors_header

    infos, meta = read_safetensors_header(r.final)  # kohya layout by default
    assert all(k.startswith("lora_unet_") for k in infos) and any(k.endswith(".lora_down.weight") for k in infos)
    assert meta["ss_network_dim"] == "4" and meta["sdtune_step"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["sdtune_config"])["optim"]["steps"] == 4
    assert (out / "config.toml").is_file() and TrainConfig.from_toml(out / "config.toml").steps == 4
    from sdtune.formats.identify import identify

    assert identify(r.final).kind.lower().startswith("lora")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_file_reproduces_the_trained_unet_in_diffusers(tmp_path, data, pristine, fmt):
    cfg = config(tmp_path, data, steps=3, lr=1e-2, save_every=0)
    cfg.options.format = fmt
    cfg.options.alpha = 2.0  # alpha != rank: the file must carry the scale
    trained = copy.deepcopy(pristine)
    r = train(cfg, model=trained, **quiet())
    from sdtune.formats.safe_io import read_safetensors_header

    keys = list(read_safetensors_header(r.final)[0])
    assert all(k.startswith("lora_unet_" if fmt == "kohya" else "unet.") for k in keys)
    pipe = copy.deepcopy(pristine.pipe)
    from sdtune.models.testing import unet_inputs

    kw = unet_inputs(pipe.unet)
    trained.pipe.unet.eval()
    with torch.no_grad():
        before = pipe.unet(**kw).sample
        want = trained.pipe.unet(**kw).sample
        pipe.load_lora_weights(str(r.final))
        after = pipe.unet(**kw).sample
    assert not torch.allclose(before, want, atol=1e-4)
    assert torch.allclose(after, want, atol=1e-5)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_train(tmp_path, data, family):
    m = tiny_loaded(family)
    res = 16 if family == "sd2" else 32
    r = train(config(tmp_path, data, steps=2, save_every=0, resolution=res, val_split=0.25, val_timesteps=2),
              model=m, **quiet())
    assert r.stopped == "finished" and all(math.isfinite(x) for x in r.losses)
    assert math.isfinite(r.rows[-1]["val_loss"])


def test_noise_targets_follow_the_prediction_type():
    from sdtune.training.noise import NoiseModel, step_generator

    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    lat = torch.randn(2, 4, 8, 8)
    g1, g2 = step_generator(0, 1), step_generator(0, 1)
    eps = NoiseModel(cfg, "epsilon")
    v = NoiseModel(cfg, "v_prediction")
    noise, t = eps.sample(lat, g1)
    noise2, t2 = v.sample(lat, g2)
    assert torch.equal(noise, noise2) and torch.equal(t, t2)  # same (seed, step) -> same draw
    assert torch.equal(eps.target(lat, noise, t), noise)
    acp = v.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v.target(lat, noise, t), acp.sqrt() * noise - (1 - acp).sqrt() * lat, atol=1e-6)
    assert step_generator(0, 1).initial_seed() != step_generator(0, 2).initial_seed()
    assert step_generator(0, 1, 1).initial_seed() != step_generator(0, 1, 0).initial_seed()
    snr = NoiseModel(cfg, "epsilon", min_snr_gamma=5.0)
    w = snr.weights(torch.tensor([10, 990]))
    assert w[0] < 1.0 and w[1] == pytest.approx(1.0)  # low-noise steps are down-weighted


def test_invalid_setups_fail_before_training(tmp_path, data, model, tiny_random_dir):
    # the toy architecture: VAE /4 and 4 UNet levels -> multiples of 32
    with pytest.raises(SdtuneError, match="resolution 48 does not fit tiny_random.*multiple of 32"):
        train(config(tmp_path, data, model=str(tiny_random_dir), resolution=48), **quiet())
    with pytest.raises(SdtuneError, match="leaves no training images"):
        train(config(tmp_path, data, val_split=0.9), model=model, **quiet())
    with pytest.raises(SdtuneError, match="fp16 mixed precision needs a CUDA GPU"):
        train(config(tmp_path, data, mixed_precision="fp16", device="cpu"), model=model, **quiet())
    bad = config(tmp_path, data)
    bad.options.targets = ["no_such_module"]
    with pytest.raises(SdtuneError, match="match no UNet module"):
        train(bad, model=model, **quiet())
    assert not (tmp_path / "out" / "state").exists() or StateStore(tmp_path / "out" / "state").latest() is None


def test_bf16_mixed_precision_runs_on_cpu(tmp_path, data, model):
    r = train(config(tmp_path, data, steps=2, save_every=0, mixed_precision="bf16"), model=model, **quiet())
    assert all(math.isfinite(x) for x in r.losses)
    assert all(v.dtype == torch.float32 for v in load_file(r.final).values())  # trained weights stay fp32


# ------------------------------------------------------------------------------------------ checkpoint averaging

def test_average_checkpoints_saves_the_mean_of_the_last_n_and_trains_on_from_the_raw_weights(tmp_path, data,
                                                                                           pristine):
    """average_checkpoints 3: each checkpoint file is the mean of the raw weights at its step and the two checkpoints
    before it; the raw trajectory (losses, resumable state) is the plain run's; an interrupted run resumes to the
    same averaged files."""
    kw = dict(method="bias", steps=8, save_every=2, keep_checkpoints="all", lr=1e-2)
    plain = train(config(tmp_path, data, "plain", **kw), model=copy.deepcopy(pristine), **quiet())
    averaged = train(config(tmp_path, data, "avg", average_checkpoints=3, **kw), model=copy.deepcopy(pristine),
                     **quiet())
    assert averaged.losses == plain.losses

    def ckpt(run, step):
        return load_file(str(tmp_path / run / "checkpoints" / f"bias-{step:06d}.safetensors"))

    raw = {step: ckpt("plain", step) for step in (2, 4, 6, 8)}
    for step, window in ((2, (2,)), (4, (2, 4)), (6, (2, 4, 6)), (8, (4, 6, 8))):
        got = ckpt("avg", step)
        for k, v in got.items():
            torch.testing.assert_close(v, torch.stack([raw[s][k] for s in window]).mean(0))
    assert not torch.equal(next(iter(ckpt("avg", 8).values())), next(iter(raw[8].values())))
    final = load_file(str(averaged.final))
    assert all(torch.equal(final[k], ckpt("avg", 8)[k]) for k in final)

    def stop(trainer, step, loss):
        if step == 4:
            trainer.request_stop()

    part = train(config(tmp_path, data, "part", average_checkpoints=3, **kw), model=copy.deepcopy(pristine),
                 on_step=stop, handle_signals=False, **quiet())
    assert part.stopped == "interrupted"
    rest = train(config(tmp_path, data, "part", average_checkpoints=3, resume="auto", **kw),
                 model=copy.deepcopy(pristine), **quiet())
    assert part.losses + rest.losses == plain.losses
    for k, v in ckpt("part", 8).items():
        assert torch.equal(v, ckpt("avg", 8)[k])
    with pytest.raises(SdtuneError, match="average_checkpoints"):
        config(tmp_path, data, average_checkpoints=0).check_values()


def test_a_signal_forwarded_by_a_launcher_still_saves_the_state(tmp_path, data, pristine):
    # Ctrl-C under torchrun: the terminal's SIGINT reaches every process, then torchrun forwards SIGTERM. Two signals
    # in quick succession are one request (stop after this step, save), not "abort without saving".
    import os
    import signal

    def signal_twice(trainer, step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)

    r = train(config(tmp_path, data, steps=6, save_every=0), model=copy.deepcopy(pristine), on_step=signal_twice,
              **quiet())
    assert r.stopped == "interrupted" and r.step == 2 and r.signal == signal.SIGINT
    assert StateStore(tmp_path / "out" / "state").load().step == 2
