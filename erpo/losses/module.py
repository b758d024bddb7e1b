"""`PolicyLoss`: an nn.Module holding a LossConfig, its controller and the Clip-Cov generator: the one holder of
a loss's state (erpo's trainer and the TRL drop-in use it).

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

    def generator_for(self, device: torch.device) -> torch.Generator:
        """Clip-Cov's generator on `device` (seeded with config.seed, or restored from a checkpoint's state)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def forward(self, logits: torch.Tensor, batch, process_group=None, shift: bool = False, **head) -> LossResult:
        """erpo.policy_loss with this module's config and generator (`head`: softcap=, logit_scale=)."""
        return policy_loss(logits, batch, self.current_config(), generator=self.generator_for(logits.device),
                           process_group=process_group, shift=shift, **head)

    def linear(self, hidden: torch.Tensor, weight: torch.Tensor, batch, bias: Optional[torch.Tensor] = None,
               **options) -> LossResult:
        """The same loss from hidden states and the LM head (erpo.linear_policy_loss; options: schedule, head_backend,
        process_group, softcap, logit_scale, head_fp32)."""
        return linear_policy_loss(hidden, weight, batch, self.current_config(), bias=bias,
                                  generator=self.generator_for(hidden.device), **options)

    def step_controller(self, result) -> None:
        """Once per optimizer step, after the loss of the batch: `result` a LossResult or its metrics (reads the mean
        entropy and n_valid_tokens: one host sync)."""
        if self.controller is not None:
            self.controller.step(result.metrics if isinstance(result, LossResult) else result)

    def get_extra_state(self):
        return {
            "controller": None if self.controller is None else self.controller.state_dict(),
            "generator": self._generator_state if self._generator is None else self._generator.get_state(),
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
