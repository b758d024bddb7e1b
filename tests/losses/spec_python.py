"""The spec's formulas (docs/algorithms.md) in plain Python floats, token by token.

Independent of erpo's code: the tests compute expected losses here from the same logits (log-softmax by
math.exp/log) and compare. Slow and literal on purpose; for batches of a few dozen tokens.
"""
import math


def logp_entropy(logits_row, target, temperature=1.0):
    z = [x / temperature for x in logits_row]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    logp = [x - lse for x in z]
    return logp[target], -sum(math.exp(lp) * lp for lp in logp)


def mean(xs):
    return sum(xs) / len(xs)


def pop_std(xs):
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def sample_std(xs):
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def sign(x):
    return (x > 0) - (x < 0)


def advantages(rewards, groups, estimator):
    out = [0.0] * len(rewards)
    for g in set(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        r = [rewards[i] for i in idx]
        if len(idx) == 1 or max(r) == min(r):
            continue
        for i in idx:
            if estimator == "grpo":
                out[i] = (rewards[i] - mean(r)) / (sample_std(r) + 1e-6)
            elif estimator == "dr_grpo":
                out[i] = rewards[i] - mean(r)
            else:
                out[i] = rewards[i] - (sum(r) - rewards[i]) / (len(idx) - 1)
    return out


def quantile(xs, q):
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def erpo_token_adv(c, cells, H, old, ref, A, groups, lengths):
    """cells: list of (i, t) valid tokens in flat order. Returns (a dict, gate dict)."""
    gate, alpha, a = {}, {}, {}
    for g in set(groups):
        gc = [(i, t) for (i, t) in cells if groups[i] == g]
        hs = [H[i][t] for i, t in gc]
        mu, sd = mean(hs), pop_std(hs)
        for i, t in gc:
            gate[i, t] = 1 / (1 + math.exp(-c.gamma * (H[i][t] - mu) / (sd + 1e-6)))
    for i in range(len(A)):
        ic = [(j, t) for (j, t) in cells if j == i]
        total = sum(gate[x] for x in ic)
        for x in ic:
            alpha[x] = {"redistribute": lengths[i] * gate[x] / total if ic else 0,
                        "amplify": 1 + c.gate_lambda * gate[x], "none": 1.0}[c.gate]
            a[x] = alpha[x] * A[i]
    if c.eta != 0:
        buckets = {}
        for i in range(len(A)):
            ic = [(j, t) for (j, t) in cells if j == i]
            for pos, x in enumerate(ic):
                b = min(c.buckets - 1, math.floor(c.buckets * pos / lengths[i]))
                buckets.setdefault((groups[i], b), []).append(x)
        for members in buckets.values():
            s = [c.beta_p * (old[i][t] - ref[i][t]) for i, t in members]
            mu, sd = mean(s), pop_std(s)
            for (i, t), si in zip(members, s):
                a[i, t] += c.eta * gate[i, t] * sign(A[i]) * (si - mu) / (sd + 1e-6)
    return a, gate


def policy_loss(c, logits, targets, mask, old, ref, A=None, rewards=None, groups=None, keys=None):
    """Expected loss of LossConfig c. logits: nested lists [B][L][V]; keys: Clip-Cov's random keys [B*L]."""
    B, L = len(mask), len(mask[0])
    if A is None:
        A = advantages(rewards, groups, c.adv_estimator)
    lp = [[0.0] * L for _ in range(B)]
    H = [[0.0] * L for _ in range(B)]
    cells = [(i, t) for i in range(B) for t in range(L) if mask[i][t]]
    for i, t in cells:
        lp[i][t], H[i][t] = logp_entropy(logits[i][t], targets[i][t], c.temperature)
    lengths = [sum(1 for t in range(L) if mask[i][t]) for i in range(B)]
    n = len(cells)
    a = {(i, t): A[i] for i, t in cells}
    keep = {x: 1.0 for x in cells}
    klcov = {x: 0.0 for x in cells}
    ratio = {(i, t): math.exp(lp[i][t] - old[i][t]) for i, t in cells}
    clip = lambda r: min(max(r, 1 - c.eps_low), 1 + c.eps_high)  # noqa: E731

    if c.method == "erpo":
        a, _ = erpo_token_adv(c, cells, H, old, ref, A, groups, lengths)
    elif c.method == "high_entropy_mask":
        thr = quantile([H[i][t] for i, t in cells], 1 - c.rho)
        a = {(i, t): (a[i, t] if H[i][t] >= thr else 0.0) for i, t in cells}
    elif c.method in ("clip_cov", "kl_cov"):
        ma = mean([a[x] for x in cells])
        ml = mean([lp[i][t] for i, t in cells])
        cov = {(i, t): (a[i, t] - ma) * (lp[i][t] - ml) for i, t in cells}
        if c.method == "clip_cov":
            cand = [x for x in cells if c.clip_cov_lb < cov[x] < c.clip_cov_ub
                    and not (-a[x] * clip(ratio[x]) > -a[x] * ratio[x])]
            k = min(len(cand), max(1, math.floor(c.clip_cov_ratio * n)))
            for x in sorted(cand, key=lambda x: keys[x[0] * L + x[1]])[:k]:
                keep[x] = 0.0
        else:
            k = max(1, math.floor(c.kl_cov_ratio * n))
            for x in sorted(cells, key=lambda x: (-cov[x], x[0] * L + x[1]))[:k]:
                klcov[x] = c.kl_cov_beta
    elif c.method == "repo":
        a = {(i, t): a[i, t] - c.repo_beta * (lp[i][t] + H[i][t]) for i, t in cells}
    elif c.method == "repo_r":
        for i, t in cells:
            if a[i, t] > 0:
                a[i, t] = max(0.0, a[i, t] * (1 - c.zeta * lp[i][t]))
            elif a[i, t] < 0:
                a[i, t] = min(0.0, a[i, t] * (1 + c.zeta * lp[i][t]))

    term = {}
    for i, t in cells:
        r, ai = ratio[i, t], a[i, t]
        if c.method == "kl_cov":
            l = -r * ai
        else:
            l = -min(r * ai, clip(r) * ai)
            if c.dual_clip and ai < 0:
                l = min(l, -c.dual_clip_c * ai)
        l += klcov[i, t] * abs(lp[i][t] - old[i][t])
        if c.kl_coef:
            d = lp[i][t] - ref[i][t]
            l += c.kl_coef * {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1}[c.kl_estimator]
        l -= c.entropy_coef * H[i][t]
        term[i, t] = l * keep[i, t]
    if c.agg == "token-mean":
        return sum(term.values()) / n
    if c.agg == "seq-mean-token-mean":
        per = [sum(term[i, t] for t in range(L) if mask[i][t]) / lengths[i] for i in range(B) if lengths[i]]
        return mean(per)
    if c.agg == "seq-mean-token-sum":
        return sum(term.values()) / B
    return sum(term.values()) / (B * (c.max_len or L))
