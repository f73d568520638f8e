"""Hypernetworks: A1111's module layout and files (.pt with weights_only, legacy keys, safetensors form), the
attention processor (k/v inputs only, chained, strength 0 bit-identical), generate/CLI wiring and training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from click.testing import CliRunner

from sdtune.adapters.hypernetwork import (Hypernetwork, HypernetworkSettings, PipelineHypernetworks, context_widths,
                                          parse_hypernetwork_arg, read_hypernetwork, resolve_hypernet_tags,
                                          save_hypernetwork)
from sdtune.adapters.hypernetwork.apply import HypernetworkProcessor, attention_modules
from sdtune.adapters.hypernetwork.io import from_a1111, to_a1111
from sdtune.errors import SdtuneError
from sdtune.toy.testing import write_toy_dataset
from sdtune.training.testing import tiny_loaded


def _randomised(hn: Hypernetwork, seed: int = 1, scale: float = 0.3) -> Hypernetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return hn


# ------------------------------------------------------------------------------------------------ layout

def test_module_layout_follows_a1111_indices():
    s = HypernetworkSettings(layer_structure=[1, 2, 2, 1], activation_func="relu", is_layer_norm=True,
                             use_dropout=True, last_layer_dropout=True)
    hn = Hypernetwork([8], s)
    keys = sorted(k for k in hn.flat_state_dict() if k.startswith("8.k."))
    # Linear, ReLU, LN, (no dropout after the first: structure 0, 0.3, 0.3, 0), Linear, ReLU, LN, Dropout, ...
    assert s.dropouts() == [0, 0.3, 0.3, 0]
    types = [type(m).__name__ for m in hn.layers["8"][0].linear]
    assert types == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "ReLU", "LayerNorm", "Dropout", "Linear",
                     "LayerNorm"]
    assert "8.k.linear.0.weight" in keys and "8.k.linear.8.weight" in keys and "8.k.linear.9.weight" in keys
    assert hn.layers["8"][0].linear[0].weight.shape == (16, 8)
    plain = Hypernetwork([8])  # defaults 1, 2, 1, linear: Linear, Linear
    assert sorted(plain.flat_state_dict()) == sorted(f"8.{kv}.linear.{i}.{w}" for kv in "kv" for i in (0, 1)
                                                     for w in ("weight", "bias"))
    with pytest.raises(SdtuneError, match="activation"):
        Hypernetwork([8], HypernetworkSettings(activation_func="nope"))
    with pytest.raises(SdtuneError, match="start and end with 1"):
        Hypernetwork([8], HypernetworkSettings(layer_structure=[2, 1]))


@pytest.mark.parametrize("init", ["Normal", "XavierNormal"])
def test_fresh_layer_norm_network_starts_near_identity(init):
    # A1111 draws LayerNorm weights from N(0, 0.01) whatever the init; a unit gain would make the first delta as
    # large as the context itself (normalised LayerNorm output) and wreck the base model from step 0.
    s = HypernetworkSettings(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=True,
                             weight_initialization=init)
    m = Hypernetwork([64], s).init_weights(0).layers["64"][0]
    norms = [layer for layer in m.linear if isinstance(layer, torch.nn.LayerNorm)]
    assert norms and all(n.weight.abs().max() < 0.1 and not n.bias.any() for n in norms)
    x = torch.randn(4, 64)
    assert ((m(x) - x).norm() / x.norm()) < 0.05


def test_strength_scales_the_residual():
    hn = _randomised(Hypernetwork([8]))
    m = hn.layers["8"][0]
    x = torch.randn(2, 3, 8)
    assert torch.equal(m(x, 0.0), x)
    assert torch.allclose(m(x, 0.5) - x, (m(x, 1.0) - x) * 0.5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ files

def test_a1111_pt_and_safetensors_round_trip(tmp_path):
    s = HypernetworkSettings(layer_structure=[1, 1.5, 1], activation_func="swish", is_layer_norm=True)
    hn = _randomised(Hypernetwork([32, 64], s, name="ink", step=120, sd_checkpoint="abc", sd_checkpoint_name="m"))
    pt = save_hypernetwork(hn, tmp_path / "ink.pt")
    raw = torch.load(pt, weights_only=True)
    assert set(k for k in raw if isinstance(k, int)) == {32, 64}
    assert isinstance(raw[32], tuple) and set(raw[32][0]) == {f"linear.{i}.{w}" for i in (0, 2, 3, 4)
                                                              for w in ("weight", "bias")}
    assert raw["layer_structure"] == [1, 1.5, 1] and raw["activation_func"] == "swish" and raw["step"] == 120
    for key in ("name", "is_layer_norm", "weight_initialization", "activate_output", "use_dropout",
                "dropout_structure", "last_layer_dropout", "sd_checkpoint", "sd_checkpoint_name"):
        assert key in raw
    st = save_hypernetwork(hn, tmp_path / "ink.safetensors")
    for back in (read_hypernetwork(pt), read_hypernetwork(st)):
        a, b = hn.flat_state_dict(), back.flat_state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert back.settings == hn.settings and back.step == 120 and back.name == "ink"
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        assert "32.k.linear.0.weight" in f.keys() and f.metadata()["sdtune_format"] == "hypernetwork"


def test_legacy_linear1_linear2_file_loads(tmp_path):
    g = torch.Generator().manual_seed(0)

    def sd():
        return {"linear1.weight": torch.randn(16, 8, generator=g), "linear1.bias": torch.randn(16, generator=g),
                "linear2.weight": torch.randn(8, 16, generator=g), "linear2.bias": torch.randn(8, generator=g)}

    obj = {8: (sd(), sd())}  # the oldest files: no metadata at all
    torch.save(obj, tmp_path / "old.pt")
    hn = read_hypernetwork(tmp_path / "old.pt")
    assert hn.settings.layer_structure == [1, 2, 1] and hn.name == "old"
    assert torch.equal(hn.layers["8"][1].linear[1].weight, obj[8][1]["linear2.weight"])


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    obj = {8: ({"linear.0.weight": torch.zeros(16, 8)}, {}), "name": Evil()}
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(obj, f)
    torch.save(obj, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(SdtuneError, match="refusing|corrupt"):
            read_hypernetwork(tmp_path / name)
    assert not marker.exists()


def test_bad_files_give_one_line_errors(tmp_path):
    hn = Hypernetwork([8])
    obj = to_a1111(hn)
    obj["layer_structure"] = [1, 3, 1]
    with pytest.raises(SdtuneError, match="shape"):
        from_a1111(obj, "x.pt")
    obj = to_a1111(hn)
    obj[8][0]["linear.0.weight"][0, 0] = float("nan")
    with pytest.raises(SdtuneError, match="NaN"):
        from_a1111(obj, "x.pt")


def test_identify_info_and_convert(tmp_path):
    from sdtune.cli import _register, cli
    from sdtune.formats.identify import identify

    hn = _randomised(Hypernetwork([32, 64], name="ink"))
    pt = save_hypernetwork(hn, tmp_path / "ink.pt")
    st = save_hypernetwork(hn, tmp_path / "ink.safetensors")
    assert identify(pt).kind == "hypernetwork" and identify(st).kind == "hypernetwork"
    _register()
    r = CliRunner().invoke(cli, ["convert", str(pt), "--to", "safetensors", "--out", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "c.safetensors"), "--to", "a1111", "--out",
                                 str(tmp_path / "c.pt")])
    assert r.exit_code == 0, r.output
    back = read_hypernetwork(tmp_path / "c.pt")
    assert all(torch.equal(v, back.flat_state_dict()[k]) for k, v in hn.flat_state_dict().items())
    r = CliRunner().invoke(cli, ["info", str(st)])
    assert r.exit_code == 0 and "hypernetwork" in r.output


# ------------------------------------------------------------------------------------------------ applying

def _recorded_inputs(unet, run):
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, attn in attention_modules(unet).items():
        for proj in ("to_q", "to_k", "to_v"):
            mod = getattr(attn, proj)
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, key=f"{name}.{proj}": seen.setdefault(key, args[0].detach().clone())))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_processor_transforms_only_k_and_v_inputs(family):
    loaded = tiny_loaded(family)
    unet = loaded.pipe.unet
    widths = context_widths(unet)
    hn = _randomised(Hypernetwork(widths))
    torch.manual_seed(0)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
    x = torch.randn(1, 4, 8, 8)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64), "time_ids": torch.zeros(1, 6)}

    def run():
        with torch.no_grad():
            unet(x, 10, encoder_hidden_states=ctx, **kw)

    base = _recorded_inputs(unet, run)
    stack = PipelineHypernetworks(loaded)
    stack.set([(hn, 1.0)])
    on = _recorded_inputs(unet, run)
    first = next(iter(attention_modules(unet)))  # the first attention sees the same input in both runs
    assert torch.equal(on[f"{first}.to_q"], base[f"{first}.to_q"])
    q_in = base[f"{first}.to_q"]
    pair = hn.pair(q_in.shape[-1])
    assert torch.allclose(on[f"{first}.to_k"], pair[0](q_in), atol=1e-6)
    assert torch.allclose(on[f"{first}.to_v"], pair[1](q_in), atol=1e-6)
    cross = next(n for n, a in attention_modules(unet).items() if a.is_cross_attention)
    assert torch.allclose(on[f"{cross}.to_k"], hn.pair(ctx.shape[-1])[0](ctx), atol=1e-6)
    stack.set([])
    assert not any(type(a.processor).__name__ == "HypernetworkProcessor" for a in attention_modules(unet).values())
    assert all(torch.equal(v, _recorded_inputs(unet, run)[k]) for k, v in base.items())


def test_several_are_chained_in_order(sd1):
    loaded = copy.deepcopy(sd1)
    w = context_widths(loaded.pipe.unet)
    a, b = _randomised(Hypernetwork(w), 1), _randomised(Hypernetwork(w), 2)
    stack = PipelineHypernetworks(loaded)
    stack.set([(a, 0.7), (b, 0.4)])
    x = torch.randn(1, 5, w[0])
    got = stack.stack.transform(x, 0)
    want = b.pair(w[0])[0](a.pair(w[0])[0](x, 0.7), 0.4)
    assert torch.equal(got, want)
    stack.set([(b, 0.4), (a, 0.7)])
    assert not torch.allclose(stack.stack.transform(x, 0), want)


def test_hypernetwork_for_another_model_is_refused(sd1, tmp_path):
    path = save_hypernetwork(Hypernetwork([768, 320]), tmp_path / "sd1real.pt")
    with pytest.raises(SdtuneError, match="another model family"):
        PipelineHypernetworks(copy.deepcopy(sd1)).set([(path, 1.0)])


def test_generate_strength_zero_is_bit_identical_and_tags_work(sd1, tmp_path):
    from sdtune.generate import GenerationParams, Generator

    w = context_widths(sd1.pipe.unet)
    path = save_hypernetwork(_randomised(Hypernetwork(w), scale=0.5), tmp_path / "hn" / "ink.safetensors")
    gen = Generator(copy.deepcopy(sd1))
    params = GenerationParams(prompt="a red circle", seed=3, steps=3, width=32, height=32)

    def img(prompt="a red circle"):
        import numpy as np

        return np.asarray(gen.generate(params.replace(prompt=prompt))[0].image).astype(int)

    base = img()
    gen.set_hypernetworks([(path, 0.0)])
    assert (img() == base).all()
    gen.set_hypernetworks([(path, 1.0)])
    full = img()
    gen.set_hypernetworks([(path, 0.5)])
    half = img()
    assert (full != base).any() and (half != base).any() and (half != full).any()
    gen.set_hypernetworks([], dirs=[tmp_path / "hn"])
    assert (img() == base).all()
    assert (img("a red circle <hypernet:ink:1>") == full).all()
    assert (img("a red circle <hypernet:ink:0>") == base).all()
    assert (img() == base).all()  # a tag applies to its own prompt only
    with pytest.raises(SdtuneError, match="did you mean ink"):
        img("a red circle <hypernet:inks:1>")


def test_arg_and_tag_resolution(tmp_path):
    assert parse_hypernetwork_arg("a/b.pt:0.5") == ("a/b.pt", 0.5)
    assert parse_hypernetwork_arg("a/b.pt") == ("a/b.pt", 1.0)
    (tmp_path / "sub").mkdir()
    for name in ("sub/ink.pt", "sub/ink.safetensors", "other.pt"):
        (tmp_path / name).write_bytes(b"x")
    got = resolve_hypernet_tags([("ink", 0.3), ("sub/ink", 1.0), ("OTHER", 2.0)], [tmp_path])
    assert got == [(tmp_path / "sub/ink.safetensors", 0.3), (tmp_path / "sub/ink.safetensors", 1.0),
                   (tmp_path / "other.pt", 2.0)]
    with pytest.raises(SdtuneError, match="--hypernetwork-dir"):
        resolve_hypernet_tags([("ink", 1.0)], [])


def test_cli_generate_with_hypernetwork(tmp_path, tiny_random_dir):
    from sdtune.cli import _register, cli

    _register()
    path = save_hypernetwork(_randomised(Hypernetwork([32, 64])), tmp_path / "ink.pt")
    args = ["generate", "a red circle", "--model", str(tiny_random_dir), "--steps", "2", "--seed", "1"]
    r = CliRunner().invoke(cli, args + ["--hypernetwork", f"{path}:0.5", "--out", str(tmp_path / "o1")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, args + ["--hypernetwork", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "no such file" in str(r.exception or r.output)


# ------------------------------------------------------------------------------------------------ training

def test_train_hypernetwork_saves_a1111_and_safetensors(sd1, tmp_path):
    from sdtune.training import TrainConfig, train

    data = write_toy_dataset(tmp_path / "data", 2, size=32)
    for fmt, ext in (("safetensors", ".safetensors"), ("a1111", ".pt")):
        cfg = TrainConfig(method="hypernetwork", data=str(data), out=str(tmp_path / fmt), steps=4, lr="1e-3:2, 1e-4",
                          resolution=32, save_every=2, progress=False, tensorboard=False, batch_size=2)
        cfg.options.activation = "relu"
        cfg.options.format = fmt
        before = {k: v.clone() for k, v in copy.deepcopy(sd1).pipe.unet.state_dict().items()}
        model = copy.deepcopy(sd1)
        result = train(cfg, model=model, echo=lambda s: None)
        assert result.final is not None and result.final.suffix == ext
        hn = read_hypernetwork(result.final)
        assert hn.step == 4 and hn.settings.activation_func == "relu" and hn.widths == context_widths(model.pipe.unet)
        assert any(not torch.equal(p, torch.zeros_like(p)) for p in hn.parameters())
        after = model.pipe.unet.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the UNet stays frozen
        # and the caller's model generates as before: the training processors are gone
        processors = [m.processor for m in attention_modules(model.pipe.unet).values()]
        assert not any(isinstance(p, HypernetworkProcessor) for p in processors)
        lrs = [r["lr"] for r in __import__("sdtune.training.runlog", fromlist=["x"]).read_log(result.log)
               if r["event"] == "step"]
        assert lrs[:3] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_train_cli_dry_run_has_the_layer_options(tmp_path):
    from sdtune.cli import _register, cli

    _register()
    data = write_toy_dataset(tmp_path / "data", 1, size=32)
    r = CliRunner().invoke(cli, ["train", "hypernetwork", "--data", str(data), "--out", str(tmp_path / "o"),
                                 "--layer-structure", "1,1.5,1", "--activation", "mish", "--layer-norm",
                                 "--weight-init", "KaimingNormal", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert 'layer_structure = "1,1.5,1"' in r.output and 'activation = "mish"' in r.output
    r = CliRunner().invoke(cli, ["train", "hypernetwork", "--data", str(data), "--out", str(tmp_path / "o"),
                                 "--layer-structure", "2,1", "--dry-run"])
    assert r.exit_code != 0


def test_infotext_records_explicit_hypernetworks(sd1, tmp_path):
    from sdtune.generate import GenerationParams, Generator
    from sdtune.generate.pnginfo import parse_infotext

    path = save_hypernetwork(_randomised(Hypernetwork(context_widths(sd1.pipe.unet))), tmp_path / "ink.pt")
    gen = Generator(copy.deepcopy(sd1))
    gen.set_hypernetworks([(path, 0.5)])
    text = gen.generate(GenerationParams(prompt="a red circle", seed=1, steps=2, width=32, height=32))[0].infotext
    fields = parse_infotext(text)
    assert "Hypernet: ink" in text and "Hypernet strength: 0.5" in text, text
    assert fields is not None


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_train_on_sd2_and_sdxl(family, tmp_path):
    from sdtune.training import TrainConfig, train

    model = tiny_loaded(family)
    data = write_toy_dataset(tmp_path / "data", 2, size=64)
    cfg = TrainConfig(method="hypernetwork", data=str(data), out=str(tmp_path / "o"), steps=2, lr=1e-3,
                      resolution=64, save_every=0, progress=False, tensorboard=False)
    cfg.options.layer_norm = True
    cfg.options.use_dropout = True
    cfg.options.layer_structure = "1, 2, 2, 1"
    result = train(cfg, model=model, echo=lambda s: None)
    hn = read_hypernetwork(result.final)
    assert hn.widths == context_widths(model.pipe.unet) and hn.settings.dropouts() == [0, 0.3, 0, 0]


def test_resumed_run_equals_an_uninterrupted_one(sd1, tmp_path):
    from sdtune.training import TrainConfig, train

    data = write_toy_dataset(tmp_path / "data", 3, size=32)

    def cfg(name, **kw):
        c = TrainConfig(method="hypernetwork", data=str(data), out=str(tmp_path / name), steps=4, lr=1e-3,
                        resolution=32, save_every=2, progress=False, tensorboard=False, **kw)
        c.options.use_dropout = True  # dropout draws from the global RNG: its state must be restored too
        c.options.layer_structure = "1, 2, 2, 1"
        c.options.min_strength = 0.5  # the per-step strength draw must resume exactly too
        return c

    full = train(cfg("full"), model=copy.deepcopy(sd1), echo=lambda s: None)

    def stop(trainer, step, loss):
        if step == 2:
            trainer.request_stop()

    part = train(cfg("part"), model=copy.deepcopy(sd1), on_step=stop, handle_signals=False, echo=lambda s: None)
    assert part.stopped == "interrupted"
    rest = train(cfg("part", resume="auto"), model=copy.deepcopy(sd1), echo=lambda s: None)
    assert part.losses + rest.losses == full.losses
    a, b = read_hypernetwork(full.final).flat_state_dict(), read_hypernetwork(rest.final).flat_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_uncond_keeps_the_empty_prompt_prediction(sd1, tmp_path):
    """keep_uncond distils the empty-prompt prediction towards the base model's: after the same training, the
    hypernetwork changes it much less than without the term (which is what lets CFG amplify the learned style)."""
    from sdtune.training import TrainConfig, train

    data = write_toy_dataset(tmp_path / "data", 2, size=32)
    hidden = sd1.pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        base = copy.deepcopy(sd1).pipe.unet(x, t, encoder_hidden_states=hidden).sample

    def empty_prompt_change(keep: float) -> float:
        cfg = TrainConfig(method="hypernetwork", data=str(data), out=str(tmp_path / f"k{keep}"), steps=6, lr=2e-2,
                          resolution=32, save_every=0, progress=False, tensorboard=False, batch_size=2)
        cfg.options.keep_uncond = keep
        result = train(cfg, model=copy.deepcopy(sd1), echo=lambda s: None)
        assert all(torch.isfinite(torch.tensor(result.losses)))
        fresh = copy.deepcopy(sd1)
        PipelineHypernetworks(fresh).set([(result.final, 1.0)])
        with torch.no_grad():
            with_hn = fresh.pipe.unet(x, t, encoder_hidden_states=hidden).sample
        return float((with_hn - base).pow(2).mean())

    free, kept = empty_prompt_change(0.0), empty_prompt_change(20.0)
    assert free > 0 and kept < 0.5 * free, (free, kept)


@pytest.mark.parametrize("option, value", [("keep_uncond", -1.0), ("keep_uncond_share", 0.0),
                                           ("keep_uncond_share", 1.5), ("min_strength", -0.1), ("min_strength", 2.0),
                                           ("max_strength", 0.5)])
def test_out_of_range_options_are_refused(tmp_path, option, value):
    from sdtune.training import TrainConfig

    cfg = TrainConfig(method="hypernetwork", data=str(tmp_path), out=str(tmp_path / "o"), steps=2)
    setattr(cfg.options, option, value)
    with pytest.raises(SdtuneError, match=option.split("_")[0]):
        cfg.check_values()


def _set_up_method(sd1, tmp_path, **options):
    from sdtune.training import TrainConfig
    from sdtune.training.methods.hypernetwork import HypernetworkMethod

    cfg = TrainConfig(method="hypernetwork", data=str(tmp_path), out=str(tmp_path / "o"), steps=2, seed=3)
    for k, v in options.items():
        setattr(cfg.options, k, v)
    method = HypernetworkMethod(cfg.options)
    method.setup(copy.deepcopy(sd1), cfg)
    return method


def test_min_strength_draws_a_strength_per_step_and_samples_at_full(sd1, tmp_path):
    method = _set_up_method(sd1, tmp_path, min_strength=0.25, max_strength=1.5)
    method.network.train()
    drawn = [method.training_strength(step) for step in range(1, 41)]
    assert all(0.25 <= s <= 1.5 for s in drawn) and len(set(drawn)) == 40
    assert min(drawn) < 0.5 and max(drawn) > 1.25  # spread over the range
    assert drawn == [method.training_strength(step) for step in range(1, 41)]  # a function of (seed, step)
    method.network.eval()
    assert method.training_strength(7) == 1.0
    method.network.train()
    method.stack.entries = [(method.network, 0.3)]
    with method.apply_for_sampling(object()):
        assert method.stack.entries[0][1] == 1.0
    assert method.stack.entries[0][1] == 0.3
    assert _set_up_method(sd1, tmp_path).training_strength(5) == 1.0  # the default: always full


def test_keep_uncond_share_uses_part_of_the_batch(sd1, tmp_path):
    from sdtune.training.methods.base import Batch

    method = _set_up_method(sd1, tmp_path, keep_uncond=1.0, keep_uncond_share=0.5)
    seen = []

    def diffusion_loss(latents, cond, target=None):
        seen.append((latents.shape[0], cond.encoder_hidden_states.shape[0]))
        return torch.zeros(())

    batch = Batch(latents=torch.zeros(4, 4, 4, 4), captions=["a", "b", "c", "d"], step=1)
    method.extra_loss(batch, diffusion_loss)
    assert seen == [(2, 2)]
