"""LoRA files that load everywhere: kohya / diffusers(PEFT) / LyCORIS LoCon reading and writing, the self-check
against diffusers, applying several LoRAs to a loaded pipeline, and merging them into a model.

    net = network_from_peft(components)                   # after training (PEFT adapters on unet/text encoders)
    path = save_lora(net, "style.safetensors")            # kohya layout (format="diffusers" for PEFT layout)
    verify_lora_file(path, components, lora_deltas_from_peft(components))   # reloads through diffusers
    PipelineLoras.for_pipeline(pipe).set([(path, 0.8), ("other.safetensors", 0.5)])
    merge_loras(pipe, [(path, 0.8)])                      # bake into the weights
"""

from sdtune.adapters.lora.apply import PipelineLoras, apply_loras
from sdtune.adapters.lora.io import FORMATS, network_from_state_dict, read_lora, save_lora
from sdtune.adapters.lora.merge import merge_loras
from sdtune.adapters.lora.network import LoraModule, LoraNetwork
from sdtune.adapters.lora.tags import lora_short_hash, parse_lora_arg, resolve_lora_tags
from sdtune.adapters.lora.from_peft import lora_deltas_from_peft, network_from_peft
from sdtune.adapters.lora.verify import VerifyResult, verify_lora_file

__all__ = ["FORMATS", "LoraModule", "LoraNetwork", "PipelineLoras", "VerifyResult", "apply_loras",
           "lora_deltas_from_peft", "lora_short_hash", "merge_loras", "network_from_peft", "network_from_state_dict",
           "parse_lora_arg", "read_lora", "resolve_lora_tags", "save_lora", "verify_lora_file"]
