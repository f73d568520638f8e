"""Run kohya sd-scripts' own checkpoint loaders on what sdtune's checkpoint writer produces for the full-size
SD1.5, SD2.1 and SDXL base architectures (meta tensors: every key name and shape, no weights, seconds on a CPU).

    KOHYA=/path/to/sd-scripts python scripts/interop_kohya_check.py

kohya's loaders match keys strictly (missing or unexpected keys raise). Two adaptations, said here because they are
not kohya's: `library.utils` is replaced by a stub (it imports torchvision and cv2 for unrelated helpers; only its
setup_logging is used), einops is stubbed when absent (used only in forward passes), and when the installed
transformers is 5.x, whose CLIPTextModel keys lack the `text_model.` prefix kohya's pinned 4.x has, that prefix is
dropped before kohya's strict comparison. Used for tests/test_conformance_checkpoints.py's kohya column.
"""

from __future__ import annotations

import os
import sys
import types

import torch


def main() -> None:
    kohya = os.environ.get("KOHYA")
    if not kohya or not os.path.isdir(os.path.join(kohya, "library")):
        sys.exit("set KOHYA to a kohya-ss/sd-scripts checkout")
    sys.path.insert(0, kohya)
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")
        stub.rearrange = stub.repeat = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError())  # type: ignore
        sys.modules["einops"] = stub
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules["library.utils"] = utils
    import transformers
    from library import model_util, sdxl_model_util

    def strip(model: torch.nn.Module, sd: dict) -> dict:
        clip = isinstance(model, (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection))
        if clip and not any(n.startswith("text_model.") for n in model.state_dict()):
            return {(n[len("text_model."):] if n.startswith("text_model.") else n): v for n, v in sd.items()}
        return sd

    orig_load = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: orig_load(self, strip(self, sd), *a, **k)  # type: ignore
    orig_dev = sdxl_model_util._load_state_dict_on_device
    sdxl_model_util._load_state_dict_on_device = lambda m, sd, *a, **k: orig_dev(m, strip(m, sd), *a, **k)

    import sdtune.formats.checkpoint as ck
    from tests.test_conformance_checkpoints import meta_components

    got: dict = {}
    ck.save_safetensors_atomic = lambda t, p, m: got.update(t=t) or p  # type: ignore[assignment]
    for family in ("sd1", "sd2", "sdxl"):
        ck.save_single_file(meta_components(family), "model.safetensors", family)
        sd = dict(got["t"])
        model_util.load_file = sdxl_model_util.load_file = lambda *a, **k: dict(sd)
        with torch.device("meta"):
            if family == "sdxl":
                out = sdxl_model_util.load_models_from_sdxl_checkpoint("sdxl_base_v1-0", "model.safetensors", "meta")
            else:
                out = model_util.load_models_from_stable_diffusion_checkpoint(family == "sd2", "model.safetensors",
                                                                             "meta")
        print(f"{family}: {len(sd)} tensors; kohya loaded {', '.join(type(m).__name__ for m in out[:4])}")


if __name__ == "__main__":
    main()
