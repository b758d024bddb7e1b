"""The per-token objectives (LossConfig.objective): one enum, whose values are the codes the per-token kernels
take, and what the loss layer reads of each. The formulas: `_surrogate` in erpo/losses/token_loss.py (the torch
twin and reference), kernels/policy_loss.py (Triton), csrc/token_loss_math.h (CUDA); tests/csrc/
test_host_token_loss.py holds the kernels' codes equal to these. Torch-free (LossConfig validates against it)."""
import enum
from dataclasses import dataclass
from typing import Callable


class Objective(enum.IntEnum):
    CLIP = 0  # PPO clip, with the optional delta cap and dual clip
    PLAIN = 1  # the ratio surrogate without the clip (KL-Cov's)
    CISPO = 2  # the detached, clipped ratio weighs the log-prob
    SAPO = 3  # a soft gate in place of the clip
    VESPO = 4  # the response's detached weight phi on the log-prob
    GPG = 5  # -a logp, no ratio
    GMPO = 6  # a geometric-mean ratio per response, clipped in log space


@dataclass(frozen=True)
class Spec:
    row_local: bool = True  # a token's term from its own values only: the one-pass fused-head schedule is exact
    seq_coef: bool = False  # takes the response's detached weight (TokenExtras.seq_coef)
    token_advantage: bool = True  # linear in a per-token advantage: the token-shaping controls apply to it
    uses_eps: Callable = lambda config: False  # whether it uses the clip range [1 - eps_low, 1 + eps_high] (ADAPO)
    inert_on_policy: str = ""  # what it cannot do while every importance ratio is 1 (erpo/train/offpolicy.py)


SPECS = {
    Objective.CLIP: Spec(uses_eps=lambda config: True,
                         inert_on_policy="the PPO clip (eps_low {eps_low}, eps_high {eps_high})"),
    Objective.PLAIN: Spec(),
    Objective.CISPO: Spec(uses_eps=lambda config: config.cispo_clip == "two_sided",
                          inert_on_policy="CISPO's truncation of the ratio weight"),
    Objective.SAPO: Spec(inert_on_policy="SAPO's soft gate"),
    Objective.VESPO: Spec(row_local=False, seq_coef=True, inert_on_policy="VESPO's weighting of each response's ratio"),
    Objective.GPG: Spec(),
    Objective.GMPO: Spec(row_local=False, seq_coef=True, token_advantage=False, uses_eps=lambda config: True,
                         inert_on_policy="GMPO's log-space clip"),
}
OBJECTIVES = tuple(o.name.lower() for o in Objective)


def spec(name: str) -> Spec:
    return SPECS[Objective[name.upper()]]
