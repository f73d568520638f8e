"""`bias`: train only the UNet's bias terms (BitFit). A tiny, complete method: the simplest example of the
`TrainingMethod` interface, and the one the loop's tests use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.methods.base import TrainingMethod, trainable

if TYPE_CHECKING:
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig


class UNetBiasMethod(TrainingMethod):
    name = "bias"
    summary = "UNet bias terms only (BitFit); an example method."
    public = False  # its file (UNet bias tensors) is not a format other tools read

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        self.model, self.config = model, config
        unet = model.pipe.unet
        self._names = [n for n, _ in unet.named_parameters() if n.endswith(".bias")]
        params = dict(unet.named_parameters())
        for n in self._names:
            params[n].requires_grad_(True)
        return [{"params": trainable(params[n] for n in self._names)}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        params = dict(self.model.pipe.unet.named_parameters())
        return {n: params[n].detach() for n in self._names}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        assert self.model is not None
        if set(state) != set(self._names):
            raise SdtuneError("saved bias weights do not match this UNet")
        params = dict(self.model.pipe.unet.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
