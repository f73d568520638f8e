"""bench/gpu.py runs its whole code path on the CPU with tiny shapes (`--smoke`): every case, both variants, the
FLOP count and MFU, the table and the JSON; and its full-size models are the real architectures (built on the meta
device: SD1.5's UNet has 859,520,964 parameters and SDXL's 2,567,463,684)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sdtune_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_smoke_runs_every_case_and_writes_the_table_and_json(bench, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    result = bench.main(["--smoke", "--json", str(out), "--peak-tflops", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"lora-sd15", "lora-sdxl", "ti-sd15", "dreambooth-sd15", "generate-sd15"}
    for name, r in rows.items():
        if name == "generate-sd15":
            assert r["sdtune_s_per_image"] > 0 and r["baseline_s_per_image"] > 0
            continue
        assert r["unet_flops_per_step"] > 0
        for v in ("sdtune", "baseline"):
            assert r[f"{v}_steps_per_s"] > 0
            assert r[f"{v}_mfu"] == pytest.approx(r["unet_flops_per_step"] * r[f"{v}_steps_per_s"] / 1e12)
    # full UNet training counts more FLOPs per step than LoRA at the same shapes (weight gradients)
    assert rows["dreambooth-sd15"]["unet_flops_per_step"] > rows["lora-sd15"]["unet_flops_per_step"] / 2
    printed = capsys.readouterr().out
    assert printed.count("baseline") >= 5 and printed.count("sdtune") >= 5 and "MFU" in printed


def test_full_cases_are_the_issue_s_and_build_the_real_architectures(bench):
    full = {c.name: c for c in bench.cases(smoke=False)}
    assert (full["lora-sd15"].resolution, full["lora-sd15"].batch) == (512, 8)
    assert (full["lora-sdxl"].resolution, full["lora-sdxl"].batch, full["lora-sdxl"].checkpointing) == (1024, 1, True)
    sizes = {}
    for family in ("sd1", "sdxl"):
        model = bench.build_model(family, False, torch.device("meta"), torch.bfloat16)
        assert model.pipe.unet.dtype == torch.bfloat16
        sizes[family] = sum(p.numel() for p in model.pipe.unet.parameters())
    assert sizes == {"sd1": 859_520_964, "sdxl": 2_567_463_684}
