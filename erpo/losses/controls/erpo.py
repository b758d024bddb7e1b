"""ERPO (erpo's reading of arXiv 2603.28204, spec section 3): entropy gate (i), progress buckets (ii), anchored
synthesis (iii) of the token advantage."""
from erpo.losses.controls import Control, choice, integer, lazy, numbers, on_advantage

torch, F = lazy("torch"), lazy("torch.nn.functional")
lib, segments = lazy("erpo.losses.shaping"), lazy("erpo.losses.segments")
STD_EPS = 1e-6
GATE_MODES = ("redistribute", "amplify", "none")


def check(config) -> None:
    numbers(config, "gamma", "gate_lambda", "beta_p", "eta")
    choice("gate", config.gate, GATE_MODES)
    if config.gamma <= 0:
        raise ValueError(f"LossConfig.gamma must be > 0 (gate sharpness), got {config.gamma}")
    if config.gate_lambda < 0:
        raise ValueError(f"LossConfig.gate_lambda must be >= 0, got {config.gate_lambda}")
    integer("buckets", config.buckets, 1)


def _segment_logsumexp(values, segment, valid, n_segments: int):
    neg_inf = torch.full_like(values, -float("inf"))
    values = torch.where(valid, values, neg_inf)
    peak = neg_inf.new_full((n_segments,), -float("inf")).scatter_reduce(0, segment, values, reduce="amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = segments.segment_sum(torch.exp(values - peak[segment]), segment, n_segments)
    return peak + torch.log(total)


def erpo_advantage(config, tokens, base):
    """Spec section 3: entropy gate (i), progress buckets (ii), anchored synthesis (iii)."""
    valid, seq, n_seqs = tokens.valid, tokens.seq, tokens.n_seqs
    zeros = torch.zeros_like(base)
    group = tokens.group[seq]
    mean, std, _ = segments.segment_mean_std(tokens.entropy, group, valid, n_seqs)
    z = (tokens.entropy - mean[group]) / (std[group] + STD_EPS)
    gate = torch.where(valid, torch.sigmoid(config.gamma * z), zeros)
    lengths = tokens.seq_lengths()
    if config.gate == "redistribute":
        # alpha = L_i w / sum_t m w, in log space so a response whose gates all underflow still sums to L_i.
        log_gate = F.logsigmoid(config.gamma * z)
        log_norm = _segment_logsumexp(log_gate, seq, valid, n_seqs)
        alpha = lengths[seq] * torch.exp(log_gate - log_norm[seq])
    elif config.gate == "amplify":
        alpha = 1.0 + config.gate_lambda * gate
    else:
        alpha = torch.ones_like(base)
    adv = torch.where(valid, alpha * base, zeros)
    if config.eta != 0:
        progress = config.beta_p * (tokens.old - tokens.ref)
        position = segments.positions_in_segment(valid, seq, n_seqs)
        k = config.buckets
        bucket = torch.clamp(torch.div(k * position, lengths[seq].long().clamp_min(1), rounding_mode="floor"), 0, k - 1)
        slot = group * k + bucket
        b_mean, b_std, _ = segments.segment_mean_std(progress, slot, valid, n_seqs * k)
        normalized = (progress - b_mean[slot]) / (b_std[slot] + STD_EPS)
        anchored = gate * torch.sign(base) * normalized
        adv = adv + config.eta * torch.where(valid, anchored, zeros)
    cdp = valid & (gate > 0.5)
    n_cdp = cdp.sum()
    metrics = {
        "cdp_rate": n_cdp / tokens.n_valid,
        "entropy_cdp": torch.where(cdp, tokens.entropy, zeros).sum() / n_cdp.clamp_min(1),
        "gate_mean": lib.valid_mean(gate, tokens),
    }
    return lib.Shaping(adv=adv, metrics=metrics)


def _population_normalize(values: list) -> list:
    """(x - mean) / (std + 1e-6) with the population std; one value gives 0."""
    t = torch.stack(values)
    return list((t - t.mean()) / (t.std(unbiased=False) + STD_EPS))


def naive(config, d) -> None:
    """Group by group, response by response, bucket by bucket in Python loops."""
    ids, L = d.batch["group_ids"].tolist(), d.mask.shape[1]
    gate, alpha, shaped = torch.zeros_like(d.H), torch.ones_like(d.H), torch.zeros_like(d.H)
    for group in sorted(set(ids)):
        members = [i for i, g in enumerate(ids) if g == group]
        cells = [(i, t) for i in members for t in range(L) if d.mask[i, t]]
        if not cells:
            continue
        for (i, t), zi in zip(cells, _population_normalize([d.H[i, t] for i, t in cells])):
            gate[i, t] = torch.sigmoid(config.gamma * zi)
        buckets = {}
        for i in members:
            positions = [t for t in range(L) if d.mask[i, t]]
            n = len(positions)
            total_gate = sum(gate[i, t] for t in positions) if positions else 0
            for pos, t in enumerate(positions):
                if config.gate == "redistribute":
                    alpha[i, t] = n * gate[i, t] / total_gate
                elif config.gate == "amplify":
                    alpha[i, t] = 1 + config.gate_lambda * gate[i, t]
                buckets.setdefault(min(config.buckets - 1, (config.buckets * pos) // n), []).append((i, t))
        for i, t in cells:
            shaped[i, t] = alpha[i, t] * d.a[i, t]
        if config.eta != 0:
            for cells_in_bucket in buckets.values():
                s = [config.beta_p * (d.old[i, t] - d.ref[i, t]) for i, t in cells_in_bucket]
                for (i, t), s_norm in zip(cells_in_bucket, _population_normalize(s)):
                    shaped[i, t] = shaped[i, t] + config.eta * gate[i, t] * torch.sign(d.adv_seq[i]) * s_norm
    d.a = shaped
    d.metrics["cdp_rate"] = (d.mask & (gate > 0.5)).sum() / d.mask.sum()


CONTROL = Control(
    name="erpo", order=10, check=check, reads_entropy=True, needs_groups=True,
    needs_ref=lambda config: config.eta != 0,
    knobs=dict(gamma=5.0, gate="redistribute", gate_lambda=1.0, beta_p=0.1, buckets=8, eta=0.0),
    apply=on_advantage(erpo_advantage),
    naive=naive,
)
