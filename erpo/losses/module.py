"""`PolicyLoss`: an nn.Module holding a LossConfig, its controller and the Clip-Cov generator.

Its state (controller value, generator state) rides in the module's state_dict (extra state), so a
checkpoint of the trainer's modules restores it.
"""
from typing import Optional

import torch
from torch import nn

from erpo.losses.config import LossConfig
from erpo.losses.controllers import make_controller
from erpo.losses.linear_policy_loss import linear_policy_loss
from erpo.losses.policy_loss import LossResult, policy_loss


class PolicyLoss(nn.Module):
    def __init__(self, config: Optional[LossConfig] = None, **knobs):
        super().__init__()
        if config is not None and knobs:
            raise ValueError("give PolicyLoss either a LossConfig or knobs, not both")
        self.config = config if config is not None else LossConfig(**knobs)
        self.controller = make_controller(self.config)
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[torch.Tensor] = None

    def current_config(self) -> LossConfig:
        return self.controller.apply(self.config) if self.controller is not None else self.config

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def forward(self, logits: torch.Tensor, batch) -> LossResult:
        generator = self._generator_for(logits.device) if "clip_cov" in self.config.controls else None
        return policy_loss(logits, batch, self.current_config(), generator=generator)

    def linear(self, hidden: torch.Tensor, weight: torch.Tensor, batch, bias: Optional[torch.Tensor] = None,
               **options) -> LossResult:
        """The same loss from hidden states and the LM head (erpo.linear_policy_loss; options: schedule, head_backend)."""
        generator = self._generator_for(hidden.device) if "clip_cov" in self.config.controls else None
        return linear_policy_loss(hidden, weight, batch, self.current_config(), bias=bias, generator=generator,
                                  **options)

    def step_controller(self, result: LossResult) -> None:
        """Once per optimizer step, after the loss of the batch (reads the mean entropy: one host sync)."""
        if self.controller is not None:
            self.controller.step(result.metrics)

    def get_extra_state(self):
        return {
            "controller": None if self.controller is None else self.controller.state_dict(),
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def set_extra_state(self, state) -> None:
        if (state["controller"] is None) != (self.controller is None):
            raise ValueError("checkpoint's PolicyLoss controller does not match this config's method")
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self._generator = None
        self._generator_state = state["generator"]

    def extra_repr(self) -> str:
        parts = [f"method={self.config.method!r}"]
        if self.config.controls:
            parts.append(f"controls={self.config.controls!r}")
        return ", ".join(parts)
