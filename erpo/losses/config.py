"""`LossConfig`: one dataclass for every policy loss, with each method's defaults from the spec.

`LossConfig(method="erpo")` fills every knob left as None with that method's default
(`METHOD_DEFAULTS[method]`, over `BASE_DEFAULTS`); a knob passed explicitly wins. Every setting is checked
once, here, so a broken config fails at construction, not in the middle of training. What depends on the
batch (ref log-probs present, valid tokens, shapes) is checked by `policy_loss`.

Sources (see docs/losses.md): GRPO (Shao et al. 2024), DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025),
80/20 high-entropy mask (Wang et al. 2025), Clip-Cov / KL-Cov (Cui et al. 2025), REPO / REPO-R
(Petrenko et al. 2026), ADAPO. ERPO's gating/bucket/synthesis forms and all their constants are erpo's
own reading of arXiv 2603.28204 (its equations were not available).
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from erpo.ops import backends

METHODS = (
    "grpo", "dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "adapo",
)
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
GATE_MODES = ("redistribute", "amplify", "none")
ANNEAL_SCHEDULES = ("none", "linear", "cosine")

# Shared by every method unless its row below says otherwise: the DAPO recipe (asymmetric clip,
# token-mean, no KL), which the entropy-control papers build on.
BASE_DEFAULTS = dict(
    adv_estimator="grpo",
    eps_low=0.2,
    eps_high=0.28,
    agg="token-mean",
    max_len=None,
    dual_clip=False,
    dual_clip_c=3.0,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy_coef=0.0,
    temperature=1.0,
    backend="auto",
    check_inputs=True,
    inplace_grad=False,
    # ERPO (section 3 of the spec; erpo's constants)
    gamma=5.0,
    gate="redistribute",
    gate_lambda=1.0,
    beta_p=0.1,
    buckets=8,
    eta=0.0,
    # 80/20 high-entropy mask
    rho=0.2,
    # Clip-Cov
    clip_cov_ratio=2e-4,
    clip_cov_lb=1.0,
    clip_cov_ub=5.0,
    seed=0,
    # KL-Cov
    kl_cov_ratio=2e-3,
    kl_cov_beta=1.0,
    kl_cov_anneal="none",
    kl_cov_anneal_steps=1000,
    # REPO / REPO-R
    repo_beta=0.05,
    zeta=1e-3,
    zeta_min=1e-4,
    zeta_max=0.05,
    # ADAPO (and REPO-R): target entropy of the double/halve controller; None = entropy at the first step
    target_entropy=None,
    eps_high_max=1.0,
)

METHOD_DEFAULTS = {
    "grpo": dict(eps_high=0.2, agg="seq-mean-token-mean", kl_coef=0.04, kl_estimator="k3"),
    "dapo": dict(),
    "dr_grpo": dict(adv_estimator="dr_grpo", eps_high=0.2, agg="seq-mean-token-sum-norm"),
    "erpo": dict(eta=0.2),
    "high_entropy_mask": dict(),
    "clip_cov": dict(),
    "kl_cov": dict(),
    "repo": dict(),
    "repo_r": dict(),
    "adapo": dict(),
}


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LossConfig.{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"LossConfig.{name} must be finite, got {value}")
    return float(value)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {value!r}")


def _integer(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LossConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"LossConfig.{name} must be >= {minimum}, got {value}")


@dataclass
class LossConfig:
    """Every knob of every policy loss. None means "the method's default" (see METHOD_DEFAULTS)."""

    method: str = "grpo"
    # --- advantages and the clipped surrogate (spec sections 1-2) ---
    adv_estimator: Optional[str] = None  # estimator used when the batch gives rewards + group_ids
    eps_low: Optional[float] = None  # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: Optional[float] = None
    agg: Optional[str] = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    max_len: Optional[int] = None  # L_max of seq-mean-token-sum-norm; None = the batch's padded length L
    dual_clip: Optional[bool] = None  # for a < 0: l = min(l, -c a)
    dual_clip_c: Optional[float] = None
    kl_coef: Optional[float] = None  # beta_kl of the KL-to-reference term (needs ref_logp when > 0)
    kl_estimator: Optional[str] = None  # k1 | k2 | k3
    entropy_coef: Optional[float] = None  # beta_H of the entropy bonus -beta_H * H (gradient through H)
    temperature: Optional[float] = None  # logits are divided by it in the fused op
    backend: Optional[str] = None  # auto (triton on CUDA, torch on CPU) | torch | triton
    check_inputs: Optional[bool] = None  # validate the batch values (one host sync per call)
    inplace_grad: Optional[bool] = None  # fused op writes dlogits into the logits' storage (see logprobs_and_entropy)
    # --- ERPO (erpo's reading of arXiv 2603.28204) ---
    gamma: Optional[float] = None  # gate sharpness: w = sigmoid(gamma * group z-score of entropy)
    gate: Optional[str] = None  # redistribute | amplify | none
    gate_lambda: Optional[float] = None  # amplify: alpha = 1 + lambda * w
    beta_p: Optional[float] = None  # progress signal s = beta_p * (old - ref)
    buckets: Optional[int] = None  # K progress buckets per response
    eta: Optional[float] = None  # weight of the anchored term Psi (needs ref_logp when != 0)
    # --- 80/20 high-entropy mask ---
    rho: Optional[float] = None  # keep the PG term on the top rho of valid tokens by entropy
    # --- Clip-Cov ---
    clip_cov_ratio: Optional[float] = None  # r: pick max(1, floor(r * N_valid)) candidates
    clip_cov_lb: Optional[float] = None
    clip_cov_ub: Optional[float] = None
    seed: Optional[int] = None  # seed of the Clip-Cov pick when policy_loss gets no generator
    # --- KL-Cov ---
    kl_cov_ratio: Optional[float] = None  # k: top max(1, floor(k * N_valid)) tokens by covariance
    kl_cov_beta: Optional[float] = None  # beta of + beta * |logp - old|
    kl_cov_anneal: Optional[str] = None  # none | linear | cosine (beta -> 0 over kl_cov_anneal_steps)
    kl_cov_anneal_steps: Optional[int] = None
    # --- REPO / REPO-R / ADAPO ---
    repo_beta: Optional[float] = None  # REPO: a' = a - repo_beta * sg(logp + H)
    zeta: Optional[float] = None  # REPO-R: current zeta (the controller changes it)
    zeta_min: Optional[float] = None
    zeta_max: Optional[float] = None
    target_entropy: Optional[float] = None  # REPO-R / ADAPO controller target; None = first step's entropy
    eps_high_max: Optional[float] = None  # ADAPO: eps_high is kept in [eps_low, eps_high_max]

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        defaults = {**BASE_DEFAULTS, **METHOD_DEFAULTS[self.method]}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._validate()

    def replace(self, **changes) -> "LossConfig":
        """A copy with some knobs changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def _validate(self):
        _choice("adv_estimator", self.adv_estimator, ADV_ESTIMATORS)
        _choice("agg", self.agg, AGGREGATIONS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("gate", self.gate, GATE_MODES)
        _choice("backend", self.backend, backends.BACKENDS)
        _choice("kl_cov_anneal", self.kl_cov_anneal, ANNEAL_SCHEDULES)
        for name in ("dual_clip", "check_inputs", "inplace_grad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LossConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in (
            "eps_low", "eps_high", "dual_clip_c", "kl_coef", "entropy_coef", "temperature", "gamma", "gate_lambda",
            "beta_p", "eta", "rho", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "kl_cov_beta",
            "repo_beta", "zeta", "zeta_min", "zeta_max", "eps_high_max",
        ):
            setattr(self, name, _number(name, getattr(self, name)))
        if self.target_entropy is not None:
            self.target_entropy = _number("target_entropy", self.target_entropy)
            if self.target_entropy < 0:
                raise ValueError(f"LossConfig.target_entropy must be >= 0 (an entropy), got {self.target_entropy}")
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"LossConfig.eps_low must be in [0, 1) so that 1 - eps_low > 0, got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"LossConfig.eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip_c <= 1:
            raise ValueError(
                f"LossConfig.dual_clip_c must be > 1 (it bounds the loss of a < 0 tokens), got {self.dual_clip_c}"
            )
        if self.kl_coef < 0:
            raise ValueError(f"LossConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.temperature <= 0:
            raise ValueError(f"LossConfig.temperature must be > 0, got {self.temperature}")
        if self.gamma <= 0:
            raise ValueError(f"LossConfig.gamma must be > 0 (gate sharpness), got {self.gamma}")
        if self.gate_lambda < 0:
            raise ValueError(f"LossConfig.gate_lambda must be >= 0, got {self.gate_lambda}")
        _integer("buckets", self.buckets, 1)
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"LossConfig.rho (kept entropy quantile) must be in (0, 1], got {self.rho}")
        if not 0.0 < self.clip_cov_ratio <= 1.0:
            raise ValueError(f"LossConfig.clip_cov_ratio must be in (0, 1], got {self.clip_cov_ratio}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"LossConfig.clip_cov_lb ({self.clip_cov_lb}) must be < clip_cov_ub ({self.clip_cov_ub})"
            )
        _integer("seed", self.seed, 0)
        if not 0.0 < self.kl_cov_ratio <= 1.0:
            raise ValueError(f"LossConfig.kl_cov_ratio must be in (0, 1], got {self.kl_cov_ratio}")
        if self.kl_cov_beta < 0:
            raise ValueError(f"LossConfig.kl_cov_beta must be >= 0, got {self.kl_cov_beta}")
        _integer("kl_cov_anneal_steps", self.kl_cov_anneal_steps, 1)
        if not 0.0 < self.zeta_min <= self.zeta_max:
            raise ValueError(f"LossConfig needs 0 < zeta_min <= zeta_max, got {self.zeta_min}, {self.zeta_max}")
        if not self.zeta_min <= abs(self.zeta) <= self.zeta_max:
            raise ValueError(f"LossConfig.|zeta| must be in [zeta_min, zeta_max], got {self.zeta}")
        if self.eps_high_max < self.eps_low:
            raise ValueError(f"LossConfig.eps_high_max ({self.eps_high_max}) must be >= eps_low ({self.eps_low})")
        if self.method == "adapo" and not self.eps_low <= self.eps_high <= self.eps_high_max:
            raise ValueError(
                f"ADAPO keeps eps_high in [eps_low, eps_high_max] = [{self.eps_low}, {self.eps_high_max}], "
                f"got {self.eps_high}"
            )
        if self.max_len is not None:
            _integer("max_len", self.max_len, 1)

    @property
    def needs_ref(self) -> bool:
        """Whether the batch must carry ref_logp."""
        return self.kl_coef > 0 or (self.method == "erpo" and self.eta != 0)

    @property
    def has_entropy_grad(self) -> bool:
        return self.entropy_coef != 0
