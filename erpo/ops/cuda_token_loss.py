"""backend='cuda' of the per-token policy loss: csrc/policy_loss_token.cu, bound to torch by the optional
extension `erpo._C` (the same contract as kernels/policy_loss.py; erpo/losses/token_loss.py picks the backend)."""
import torch

EXTRA_NAMES = ("log_ratio", "seq_coef", "eps_low", "eps_high", "kl_weight", "pg_weight")  # TokenExtras, in order


def token_kernel_args(logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """The per-token kernel's (12 arrays, 11 float scalars, 6 int codes) in csrc/policy_loss_token.h's order
    (the host shim's too); an absent array is None."""
    arrays = [logp, entropy, old, adv, ref, klcov_w, *(getattr(extras, name, None) for name in EXTRA_NAMES)]
    scalars = [float(x) for x in (
        params.eps_low, params.eps_high, 1.0 - params.eps_low, 1.0 + params.eps_high, params.dual_clip_c,
        params.kl_coef, params.entropy_coef, 0.0 if params.delta is None else params.delta, params.cispo_max,
        params.sapo_tau_pos, params.sapo_tau_neg)]
    codes = [params.objective_code, int(params.dual_clip), int(params.delta is not None),
             int(params.cispo_clip == "upper"), params.kl_code, int(params.kl_bias_correction)]
    return arrays, scalars, codes


def token_terms(logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """The per-token loss terms on csrc/policy_loss_token.cu: the same contract as kernels/policy_loss.py."""
    from erpo.ops.cuda_logprobs_entropy import extension  # here: that module re-exports this one's names

    ext, n = extension(), logp.numel()
    arrays, _, _ = token_kernel_args(logp, entropy, old, adv, ref, klcov_w, params, extras)
    arrays = [None if t is None else t.reshape(-1).float().contiguous() for t in arrays]
    out = [torch.empty(n, dtype=torch.float32, device=logp.device) for _ in range(3)]
    flags = [torch.empty(n, dtype=torch.bool, device=logp.device) for _ in range(2)]
    if n:
        ext.policy_loss_token(
            *arrays, *out, *flags, params.eps_low, params.eps_high, params.dual_clip_c, params.kl_coef,
            params.entropy_coef, params.delta, params.cispo_max, params.sapo_tau_pos, params.sapo_tau_neg,
            params.objective_code, params.dual_clip, params.cispo_clip == "upper", params.kl_code,
            params.kl_bias_correction,
        )
    return (*out, *flags)

