"""Which mechanisms need an off-policy update (importance ratio != 1) to act, for the on-policy warning.

With one optimizer step per rollout batch (mini_batches = ppo_epochs = 1) the trained policy is the one
that sampled: every ratio exp(logp - old_logp) is 1 (token or sequence level), and from the loss code:
  - objective clip: the clipped surrogate equals the plain one (clip, clip-higher never bind);
  - gmpo: its clip in log space never binds; cispo: the weight min(r, cap) (or clip(r)) is 1, never truncated;
  - sapo: the soft gate sigmoid(tau (r - 1)) sits at its centre for every token: no soft trust region;
  - vespo: phi of a summed log-ratio of 0 is the same constant for every response;
  - dual clip: bounds -c*a only where the ratio is far above 1;
  - ADAPO: its controller moves eps_high, which only matters where a ratio leaves [1 - eps_low, 1 + eps_high];
  - KL-Cov: its penalty beta*|logp - old| has value and gradient 0 (sign(0) = 0) at logp = old.
Still acting on-policy: Clip-Cov (zeroes picked tokens), the 80/20 mask, ERPO, REPO/REPO-R, the KL to the
reference, entropy bonuses, gpg (no ratio at all).
"""
from erpo.losses import controls
from erpo.losses.objectives import spec


def inert_on_policy(loss_cfg) -> list[str]:
    """What the objective and controls of a LossConfig cannot do on-policy (their declarations' inert_on_policy)."""
    names = []
    objective = spec(loss_cfg.objective).inert_on_policy
    if objective:
        level = " (sequence-level ratio)" if loss_cfg.is_level == "sequence" else ""
        names.append(objective.format(eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high) + level)
        if loss_cfg.objective == "clip" and loss_cfg.eps_high != loss_cfg.eps_low:
            names.append("clip-higher")
    if loss_cfg.dual_clip:
        names.append("dual clip")
    names += [c.inert_on_policy for c in controls.ordered(loss_cfg.controls) if c.inert_on_policy]
    return names


def on_policy_warning(cfg, loss_cfg) -> str | None:
    if cfg.mini_batches > 1 or cfg.ppo_epochs > 1:
        return None
    names = inert_on_policy(loss_cfg)
    if not names:
        return None
    return ("mini_batches=1 and ppo_epochs=1: every update is on-policy (importance ratio exactly 1), so these "
            f"cannot act: {', '.join(names)}; give --mini-batches 4 (or --ppo-epochs 2) to train off-policy")
