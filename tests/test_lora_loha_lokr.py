"""LyCORIS LoHa and LoKr files: read, applied at generation time and merged, with their deltas checked against the
formula computed here independently (numpy), as A1111 (extensions-builtin/Lora/network_hada.py, network_lokr.py,
lyco_helpers.py) and ComfyUI (comfy/weight_adapter/loha.py, lokr.py) compute it.

Facts encoded (from those sources and LyCORIS' lycoris/modules/loha.py, lokr.py):
* keys `<kohya module>.hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b` (+ `hada_t1/hada_t2` Tucker cores), and
  `<kohya module>.lokr_w1 | lokr_w1_a+lokr_w1_b`, `lokr_w2 | lokr_w2_a+lokr_w2_b` (+ `lokr_t2`), `.alpha`; no
  `.weight` suffix.
* LoHa delta = (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0]; conv w1b is [r, in*kh*kw], reshaped to the layer.
  Tucker: hada_w*_a [r, out], hada_w*_b [r, in], W = einsum('ijkl,ip,jr->prkl', t, w_a, w_b).
* LoKr delta = kron(W1, W2) * alpha / dim, dim = lokr_w2_b.shape[0] if W2 is factorised else lokr_w1_b.shape[0];
  both full matrices: scale 1 whatever alpha says. Conv: kron(W1[:, :, None, None], W2) reshaped to the layer.
* `dora_scale` (DoRA on LoHa/LoKr) makes the delta depend on the base weight: refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdtune.adapters.lora import keys as K
from sdtune.adapters.lora import read_lora
from sdtune.adapters.lora.apply import PipelineLoras
from sdtune.adapters.lora.io import network_from_state_dict
from sdtune.adapters.lora.merge import merge_loras
from sdtune.adapters.lora.models import lora_layers, target_modules, unet_layout_of
from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import save_safetensors_atomic
from sdtune.models.testing import tiny_pipeline, unet_inputs

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]
torch.set_num_threads(1)

R = 3  # file rank


def _r(g: np.random.Generator, *shape: int) -> np.ndarray:
    return g.standard_normal(shape).astype(np.float32) * 0.3


def _split(n: int) -> tuple[int, int]:
    """n = a * c with a the largest divisor <= 4 (LyCORIS' factorization puts the small factor first)."""
    a = max(d for d in (1, 2, 4) if n % d == 0)
    return a, n // a


def loha_parts(g, shape, *, tucker: bool, alpha: float | None):
    """LoHa tensors for a layer of `shape` and their delta by the formula (numpy)."""
    out, inp = shape[0], shape[1]
    kernel = shape[2:]
    if tucker:
        t1, t2 = _r(g, R, R, *kernel), _r(g, R, R, *kernel)
        w1a, w1b, w2a, w2b = _r(g, R, out), _r(g, R, inp), _r(g, R, out), _r(g, R, inp)
        W1 = np.einsum("ijkl,ip,jr->prkl", t1, w1a, w1b)
        W2 = np.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)
        parts = {"hada_t1": t1, "hada_t2": t2}
    else:
        flat = inp * int(np.prod(kernel)) if kernel else inp
        w1a, w1b, w2a, w2b = _r(g, out, R), _r(g, R, flat), _r(g, out, R), _r(g, R, flat)
        W1 = (w1a @ w1b).reshape(shape)
        W2 = (w2a @ w2b).reshape(shape)
        parts = {}
    parts.update({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b})
    scale = alpha / R if alpha is not None else 1.0
    return parts, W1 * W2 * scale


def lokr_parts(g, shape, *, w1: str, w2: str, alpha: float | None):
    """LoKr tensors (w1: "full" | "ab"; w2: "full" | "ab" | "tucker") and their delta by the formula (numpy)."""
    out, inp = shape[0], shape[1]
    kernel = tuple(shape[2:])
    a, c = _split(out)
    b, d = _split(inp)
    parts: dict[str, np.ndarray] = {}
    dim = None
    if w1 == "full":
        W1 = parts["lokr_w1"] = _r(g, a, b)
    else:
        parts["lokr_w1_a"], parts["lokr_w1_b"] = _r(g, a, 2), _r(g, 2, b)
        W1, dim = parts["lokr_w1_a"] @ parts["lokr_w1_b"], 2
    if w2 == "full":
        W2 = parts["lokr_w2"] = _r(g, c, d, *kernel)
    elif w2 == "tucker":
        parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"] = _r(g, R, R, *kernel), _r(g, R, c), _r(g, R, d)
        W2 = np.einsum("ijkl,ip,jr->prkl", parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        dim = R
    else:
        flat = d * int(np.prod(kernel)) if kernel else d
        parts["lokr_w2_a"], parts["lokr_w2_b"] = _r(g, c, R), _r(g, R, flat)
        W2 = (parts["lokr_w2_a"] @ parts["lokr_w2_b"]).reshape(c, d, *kernel)
        dim = R
    if kernel:
        delta = np.kron(W1[:, :, None, None], W2)
    else:
        delta = np.kron(W1, W2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return parts, delta.reshape(shape) * scale


# variant -> (layer kind, alpha, builder)
VARIANTS = {
    "loha": ("linear", 2.0, lambda g, s, a: loha_parts(g, s, tucker=False, alpha=a)),
    "loha_conv": ("conv3", 1.5, lambda g, s, a: loha_parts(g, s, tucker=False, alpha=a)),
    "loha_tucker": ("conv3", 6.0, lambda g, s, a: loha_parts(g, s, tucker=True, alpha=a)),
    "loha_1x1_no_alpha": ("conv1", None, lambda g, s, a: loha_parts(g, s, tucker=False, alpha=a)),
    "lokr_full_ab": ("linear", 4.0, lambda g, s, a: lokr_parts(g, s, w1="full", w2="ab", alpha=a)),
    "lokr_full_full": ("linear", 5.0, lambda g, s, a: lokr_parts(g, s, w1="full", w2="full", alpha=a)),
    "lokr_ab_ab": ("linear", 1.0, lambda g, s, a: lokr_parts(g, s, w1="ab", w2="ab", alpha=a)),
    "lokr_ab_full": ("linear", 3.0, lambda g, s, a: lokr_parts(g, s, w1="ab", w2="full", alpha=a)),
    "lokr_conv_full": ("conv3", 7.0, lambda g, s, a: lokr_parts(g, s, w1="full", w2="full", alpha=a)),
    "lokr_conv_ab": ("conv3", 2.0, lambda g, s, a: lokr_parts(g, s, w1="full", w2="ab", alpha=a)),
    "lokr_conv_tucker": ("conv3", 2.0, lambda g, s, a: lokr_parts(g, s, w1="ab", w2="tucker", alpha=a)),
}


def _kind(w: torch.Tensor) -> str:
    if w.ndim == 2:
        return "linear"
    return "conv3" if tuple(w.shape[2:]) == (3, 3) else "conv1"


def build_file(pipe, path, variants, *, seed=0, per_variant=3, text=True):
    """A LyCORIS file for the tiny model, each variant on `per_variant` layers of its kind; returns
    (path, {canonical name: reference delta as a torch tensor}, {canonical name: variant})."""
    g = np.random.default_rng(seed)
    layout = unet_layout_of(pipe)
    mods = sorted(target_modules(pipe).items())
    used: dict[str, str] = {}
    sd: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for variant in variants:
        kind, alpha, make = VARIANTS[variant]
        picked = [(n, m) for n, m in mods if n not in used and K.is_lora_module(n) and _kind(m.weight) == kind
                  and (text or n.startswith("unet."))][:per_variant]
        assert picked, variant
        for name, m in picked:
            used[name] = variant
            parts, delta = make(g, tuple(m.weight.shape), alpha)
            kname = K.to_kohya(name, "sd1", layout)
            for part, t in parts.items():
                sd[f"{kname}.{part}"] = torch.from_numpy(np.ascontiguousarray(t))
            if alpha is not None:
                sd[f"{kname}.alpha"] = torch.tensor(alpha)
            want[name] = torch.from_numpy(np.ascontiguousarray(delta))
    save_safetensors_atomic(sd, path, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return path, want, used


LOHA = ["loha", "loha_conv", "loha_tucker", "loha_1x1_no_alpha"]
LOKR = ["lokr_full_ab", "lokr_full_full", "lokr_ab_ab", "lokr_ab_full", "lokr_conv_full", "lokr_conv_ab",
        "lokr_conv_tucker"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lycoris")
    pipe = tiny_pipeline("sd1")
    return {"loha": build_file(pipe, d / "loha.safetensors", LOHA, seed=1),
            "lokr": build_file(pipe, d / "lokr.safetensors", LOKR, seed=2, text=False)}


@pytest.mark.parametrize("which", ["loha", "lokr"])
def test_read_delta_equals_the_formula(files, which):
    path, want, _ = files[which]
    net = read_lora(path)
    assert set(net.lycoris) == set(want) and not net.modules
    assert net.family == "sd1" and net.algorithms() == [{"loha": "LoHa", "lokr": "LoKr"}[which]]
    for name, ref in want.items():
        got = net.lycoris[name].delta().reshape(ref.shape)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)


def unet_out(pipe):
    with torch.no_grad():
        return pipe.unet(**unet_inputs(pipe.unet)).sample


@pytest.mark.parametrize("which", ["loha", "lokr"])
def test_applied_delta_weight_zero_and_merge(files, which):
    path, want, _ = files[which]
    pipe = tiny_pipeline("sd1", seed=5)
    base = unet_out(pipe)
    loras = PipelineLoras(pipe)
    loras.set([(path, 0.7)])
    applied = unet_out(pipe)
    assert (applied - base).abs().max() > 1e-3
    layers = target_modules(pipe)
    g = torch.Generator().manual_seed(0)
    for name, ref in want.items():  # what each layer adds is the formula's delta times the weight
        layer = layers[name]
        w = layer.weight
        x = torch.randn(2, *w.shape[1:2], *((5, 5) if w.ndim == 4 else ()), generator=g)
        with torch.no_grad():
            got = layer(x)
            loras.set([(path, 0.0)])
            plain = layer(x)
            loras.set([(path, 0.7)])
        ref_w = 0.7 * ref.reshape(w.shape)
        extra = F.conv2d(x, ref_w, None, layer.stride, layer.padding) if w.ndim == 4 else F.linear(x, ref_w)
        torch.testing.assert_close(got - plain, extra, rtol=1e-4, atol=1e-5, msg=name)
    assert not list(lora_layers(pipe))  # no PEFT LoRA layer: the file's own tensors are used
    loras.set([(path, 0.0)])
    assert torch.equal(unet_out(pipe), base)  # weight 0: the base model bit for bit
    loras.set([(path, 0.7)])
    assert torch.equal(unet_out(pipe), applied)  # switching back: the same bits
    loras.unload()
    assert torch.equal(unet_out(pipe), base)

    merged = tiny_pipeline("sd1", seed=5)
    before = {n: m.weight.detach().clone() for n, m in target_modules(merged).items()}
    merge_loras(merged, [(path, 0.7)])
    after = target_modules(merged)
    for name, ref in want.items():
        torch.testing.assert_close(after[name].weight - before[name], 0.7 * ref.reshape(before[name].shape),
                                   rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(unet_out(merged), applied, rtol=1e-4, atol=1e-4)


def test_lora_loha_and_lokr_together_on_shared_layers_equal_merging_all(files, tmp_path):
    """Three files on overlapping layers (the LoHa and LoKr files share 3x3 convs, one flat and one 4-D): applied
    together, in either order, equal to merging all three."""
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network

    pipe = tiny_pipeline("sd1", seed=5)
    lora = save_lora(random_network(pipe, unet=("to_k", "conv1"), seed=4), tmp_path / "plain.safetensors")
    specs = [(lora, 0.6), (files["loha"][0], 0.7), (files["lokr"][0], -0.4)]
    assert set(files["loha"][1]) & set(files["lokr"][1])
    loras = PipelineLoras(pipe)
    loras.set(specs)
    together = unet_out(pipe)
    loras.set(specs[::-1])
    assert torch.equal(unet_out(pipe), together)  # a fixed order, whatever order they are listed in
    merged = tiny_pipeline("sd1", seed=5)
    merge_loras(merged, specs)
    torch.testing.assert_close(unet_out(merged), together, rtol=1e-4, atol=1e-4)


def test_lokr_of_two_full_matrices_has_scale_one_and_alpha_over_w2_rank(tmp_path):
    """alpha is ignored when W1 and W2 are full; with both factorised, dim is lokr_w2_b's rank (not w1_b's)."""
    name = "lora_unet_mid_block_attentions_0_proj_in"
    w1, w2 = torch.ones(2, 2), torch.eye(4)
    net = network_from_state_dict({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(9.)})
    torch.testing.assert_close(net.lycoris["unet.mid_block.attentions.0.proj_in"].delta(), torch.kron(w1, w2))
    sd = {f"{name}.lokr_w1_a": torch.ones(2, 1), f"{name}.lokr_w1_b": torch.ones(1, 2),
          f"{name}.lokr_w2_a": torch.ones(4, 2), f"{name}.lokr_w2_b": torch.ones(2, 4), f"{name}.alpha": torch.tensor(8.)}
    d = network_from_state_dict(sd).lycoris["unet.mid_block.attentions.0.proj_in"].delta()
    torch.testing.assert_close(d, torch.full((8, 8), 2.0 * 8 / 2))  # kron(ones, 2*ones) * 8 / 2


def test_real_sd1_and_sdxl_key_names_and_family(tmp_path):
    """Real layer names and shapes: SD1 attn2.to_k [320, 768]; SDXL (SGM names) input_blocks.4.1 attn2.to_k
    [640, 2048], a 3x3 conv input_blocks.1.0.in_layers.2 [320, 320, 3, 3], CLIP-G q_proj [1280, 1280]."""
    g = torch.Generator().manual_seed(0)
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a": torch.randn(320, 2),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": torch.randn(2, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w2_a": torch.randn(320, 2),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w2_b": torch.randn(2, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0)}
    net = network_from_state_dict(sd1)
    m = net.lycoris["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert net.family == "sd1" and m.weight_shape() == (320, 768) and m.native_rank == 2
    xl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lokr_w1": torch.randn(8, 16, generator=g),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lokr_w2_a": torch.randn(80, 4, generator=g),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lokr_w2_b": torch.randn(4, 128, generator=g),
          "lora_unet_input_blocks_1_0_in_layers_2.lokr_w1": torch.randn(16, 16, generator=g),
          "lora_unet_input_blocks_1_0_in_layers_2.lokr_w2": torch.randn(20, 20, 3, 3, generator=g),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.randn(1280, 2, generator=g),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_b": torch.randn(2, 1280, generator=g),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_a": torch.randn(1280, 2, generator=g),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b": torch.randn(2, 1280, generator=g)}
    net = network_from_state_dict(xl)
    assert net.family == "sdxl"
    shapes = {n: m.weight_shape() for n, m in net.lycoris.items()}
    assert shapes == {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
                      "unet.down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
                      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280)}
    conv = net.lycoris["unet.down_blocks.0.resnets.0.conv1"]
    ref = torch.kron(xl["lora_unet_input_blocks_1_0_in_layers_2.lokr_w1"][:, :, None, None],
                     xl["lora_unet_input_blocks_1_0_in_layers_2.lokr_w2"])
    torch.testing.assert_close(conv.delta(), ref, rtol=1e-4, atol=1e-4)
    assert conv.native_rank is None and conv.scale == 1.0  # two full matrices, no alpha
    assert "LoKr" in net.describe() and "family SDXL" in net.describe()


def test_dora_scale_is_refused(tmp_path):
    name = "lora_unet_mid_block_attentions_0_proj_in"
    sd = {f"{name}.hada_w1_a": torch.ones(4, 1), f"{name}.hada_w1_b": torch.ones(1, 4),
          f"{name}.hada_w2_a": torch.ones(4, 1), f"{name}.hada_w2_b": torch.ones(1, 4),
          f"{name}.dora_scale": torch.ones(4, 1)}
    with pytest.raises(SdtuneError, match="DoRA"):
        network_from_state_dict(sd)


def test_broken_lycoris_files_are_refused(tmp_path):
    name = "lora_unet_mid_block_attentions_0_proj_in"
    with pytest.raises(SdtuneError, match="hada_w2_b missing"):
        network_from_state_dict({f"{name}.hada_w1_a": torch.ones(4, 1), f"{name}.hada_w1_b": torch.ones(1, 4),
                                 f"{name}.hada_w2_a": torch.ones(4, 1)})
    with pytest.raises(SdtuneError, match="NaN"):
        network_from_state_dict({f"{name}.lokr_w1": torch.tensor([[float("nan")]]), f"{name}.lokr_w2": torch.ones(4, 4)})


def test_info_describes_and_convert_refuses(files, tmp_path):
    from sdtune.cli.convert import run_convert
    from sdtune.formats.identify import identify

    info = identify(files["loha"][0])
    assert info.kind == "lora" and info.family == "sd1"
    assert info.details["network"] == "LoHa" and info.details["ranks"] == {R: len(files["loha"][1])}
    info = identify(files["lokr"][0])
    assert info.kind == "lora" and info.details["network"] == "LoKr"
    variants = list(files["lokr"][2].values())
    full = sum(v.endswith("full_full") or v == "lokr_conv_full" for v in variants)
    w1_rank = variants.count("lokr_ab_full")  # W2 full, W1 factorised: lokr_w1_b's rank (2)
    assert info.details["ranks"] == {R: len(variants) - full - w1_rank, 2: w1_rank}
    assert info.details["full_modules"] == full > 0
    assert any("full" in line for line in info.summary)
    with pytest.raises(SdtuneError, match="Kronecker.*cannot hold it exactly"):
        run_convert(files["lokr"][0], "kohya", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
