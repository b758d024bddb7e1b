"""ADAPO: nothing per token; its controller doubles / halves eps_high toward a target entropy between optimizer
steps, within [eps_low, eps_high_max]."""
from erpo.losses.controllers import EntropyTargetController
from erpo.losses.controls import Control, numbers
from erpo.losses.objectives import spec


def check(config) -> None:
    numbers(config, "eps_high_max")
    if config.eps_high_max < config.eps_low:
        raise ValueError(f"LossConfig.eps_high_max ({config.eps_high_max}) must be >= eps_low ({config.eps_low})")
    if "adapo" not in config.controls:
        return
    if not spec(config.objective).uses_eps(config):
        raise ValueError(f"LossConfig.controls 'adapo' moves eps_high, which objective {config.objective!r} does not use")
    if not config.eps_low <= config.eps_high <= config.eps_high_max:
        raise ValueError(f"ADAPO keeps eps_high in [eps_low, eps_high_max] = [{config.eps_low}, "
                         f"{config.eps_high_max}], got {config.eps_high}")


class AdapoEpsHighController(EntropyTargetController):
    """ADAPO: eps_high doubled when entropy is below target, halved otherwise, clipped to [eps_low, eps_high_max]."""

    knob = "eps_high"

    def __init__(self, config):
        super().__init__(config)
        self.bounds_ = (config.eps_low, config.eps_high_max)


CONTROL = Control(
    name="adapo", order=90, check=check, reads_entropy=True, row_local=True, shapes_tokens=False,
    controller=AdapoEpsHighController, knobs=dict(target_entropy=None, eps_high_max=1.0),
    inert_on_policy="ADAPO (its eps_high controller)",
)
