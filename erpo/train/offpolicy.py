"""Which mechanisms need an off-policy update (importance ratio != 1) to act, for the on-policy warning.

With one optimizer step per rollout batch (mini_batches = ppo_epochs = 1) the trained policy is the one
that sampled: every ratio exp(logp - old_logp) is 1, so the PPO clip never binds and, from the loss code:
  - clip / clip-higher (eps_low, eps_high): the clipped surrogate equals the plain one;
  - dual clip: bounds -c*a only where the ratio is far above 1;
  - ADAPO: its controller moves eps_high, which only matters where a ratio leaves [1 - eps_low, 1 + eps_high];
  - KL-Cov: its penalty beta*|logp - old| has value and gradient 0 (sign(0) = 0) at logp = old.
Still acting on-policy: Clip-Cov (zeroes picked tokens), the 80/20 mask, ERPO, REPO/REPO-R, KL to the reference.
"""


def inert_on_policy(loss_cfg) -> list[str]:
    controls = tuple(getattr(loss_cfg, "controls", ()) or ())
    method = loss_cfg.method
    names = []
    if method != "kl_cov" and getattr(loss_cfg, "objective", "clip") != "plain":
        names.append(f"the PPO clip (eps_low {loss_cfg.eps_low}, eps_high {loss_cfg.eps_high})")
        if loss_cfg.eps_high != loss_cfg.eps_low:
            names.append("clip-higher")
    if loss_cfg.dual_clip:
        names.append("dual clip")
    if method == "adapo" or "adapo" in controls:
        names.append("ADAPO (its eps_high controller)")
    if method == "kl_cov" or "kl_cov" in controls:
        names.append("KL-Cov (its |logp - old| penalty)")
    return names


def on_policy_warning(cfg, loss_cfg) -> str | None:
    if cfg.mini_batches > 1 or cfg.ppo_epochs > 1:
        return None
    names = inert_on_policy(loss_cfg)
    if not names:
        return None
    return ("mini_batches=1 and ppo_epochs=1: every update is on-policy (importance ratio exactly 1), so these "
            f"cannot act: {', '.join(names)}; give --mini-batches 4 (or --ppo-epochs 2) to train off-policy")
