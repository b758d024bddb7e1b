"""`LossConfig`: one dataclass for every policy loss, with each method's defaults from the spec.

`LossConfig(method="erpo")` fills every knob left as None with that method's default
(`METHOD_DEFAULTS[method]`, over `BASE_DEFAULTS`); a knob passed explicitly wins. A method is a preset of
the composable fields: `objective` (the per-token surrogate), `is_level` (token or sequence importance
ratio), `controls` (entropy-aware selections and shapings, any number, applied to any objective where
they make sense), the corrections (`delta`, `kl_bias_correction`, `off_policy_mask`, `rollout_is`) and
the aggregation `agg`. Every setting and every combination is checked once, here, so a broken config
fails at construction, not in the middle of training. What depends on the batch (ref or rollout
log-probs present, valid tokens, shapes) is checked by `policy_loss`.

Sources (see docs/losses.md): GRPO (Shao et al. 2024), DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025),
80/20 high-entropy mask (Wang et al. 2025), Clip-Cov / KL-Cov (Cui et al. 2025), REPO / REPO-R
(Petrenko et al. 2026), ADAPO. ERPO's gating/bucket/synthesis forms and all their constants are erpo's
own reading of arXiv 2603.28204 (its equations were not available).
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

from erpo.hints import did_you_mean
from erpo.losses import controls as registry
from erpo.losses.controls import choice as _choice, integer as _integer, number as _number, numbers as _numbers
from erpo.losses.objectives import OBJECTIVES, spec
from erpo.ops import backends
from erpo.ops.support_config import Support

METHODS = (
    "grpo", "dapo", "dr_grpo", "erpo", "high_entropy_mask", "clip_cov", "kl_cov", "repo", "repo_r", "adapo",
    "bnpo", "cispo", "sapo", "gspo", "gmpo", "vespo", "luspo", "gpg",
)
IS_LEVELS = ("token", "sequence")
CONTROLS = registry.names()  # the shipped controls (erpo/losses/controls/, one file each), in the order they run
CISPO_CLIPS = ("upper", "two_sided")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")

# Shared by every method unless its row below says otherwise: the DAPO recipe (asymmetric clip,
# token-mean, no KL), which the entropy-control papers build on. Each control's knobs: its file's `knobs`.
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
    support=None,
    support_entropy="full",
    # --- composition (issue 13): objective, importance-ratio level, controls ---
    objective="clip",
    is_level="token",
    controls=(),
    cispo_clip="upper",
    cispo_max=5.0,
    sapo_tau_pos=1.0,
    sapo_tau_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    delta=None,
    kl_bias_correction=False,
    entropy_target=None,
    entropy_coef_min=0.0,
    entropy_coef_max=1.0,
    entropy_coef_step=0.005,
    off_policy_mask=None,
    rollout_is=None,
    rollout_is_min=None,
    rollout_is_max=3.0,
)

METHOD_DEFAULTS = {
    "grpo": dict(eps_high=0.2, agg="seq-mean-token-mean", kl_coef=0.04, kl_estimator="k3"),
    "dapo": dict(),
    "dr_grpo": dict(adv_estimator="dr_grpo", eps_high=0.2, agg="seq-mean-token-sum-norm"),
    "erpo": dict(eta=0.2, controls=("erpo",)),
    "high_entropy_mask": dict(controls=("high_entropy_mask",)),
    "clip_cov": dict(controls=("clip_cov",)),
    "kl_cov": dict(objective="plain", controls=("kl_cov",)),  # KL-Cov replaces the PPO clip by its penalty
    "repo": dict(controls=("repo",)),
    "repo_r": dict(controls=("repo_r",)),
    "adapo": dict(controls=("adapo",)),
    # The peers' loss types (TRL 1.16 / Liger 0.8.5 `loss_type`, verl 0.9.1 `policy_loss.loss_mode`); see docs/losses.md
    "bnpo": dict(eps_high=0.2),  # token-mean over the micro-batch (no global normalizer)
    "cispo": dict(objective="cispo"),  # MiniMax-M1; TRL/Liger: weight min(r, cispo_max), token-mean
    "sapo": dict(objective="sapo", eps_high=0.2, agg="seq-mean-token-mean"),  # soft gate instead of the clip
    "gspo": dict(is_level="sequence", eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean"),  # GSPO paper's eps
    "gmpo": dict(objective="gmpo", eps_low=0.4, eps_high=0.4, agg="seq-mean-token-mean"),  # clip in log space
    "vespo": dict(objective="vespo"),
    "luspo": dict(is_level="sequence", eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-sum"),  # length-weighted
    "gpg": dict(objective="gpg"),  # verl's GPG: -a logp, no ratio
}


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
    # the sampler's truncation, recomputed (erpo.Support; docs/support.md); replay: batch["support_ids"] instead.
    # The ratio and the KL use S; the entropy bonus and the controls read support_entropy's: "full" | "support"
    support: Optional[Support] = None
    support_entropy: Optional[str] = None
    # --- ERPO (erpo's reading of arXiv 2603.28204) ---
    gamma: Optional[float] = None  # gate sharpness: w = sigmoid(gamma * group z-score of entropy)
    gate: Optional[str] = None  # redistribute | amplify | none
    gate_lambda: Optional[float] = None  # amplify: alpha = 1 + lambda * w
    beta_p: Optional[float] = None  # progress signal s = beta_p * (old - ref)
    buckets: Optional[int] = None  # K progress buckets per response
    eta: Optional[float] = None  # weight of the anchored term Psi (needs ref_logp when != 0)
    # --- 80/20 high-entropy mask ---
    rho: Optional[float] = None  # keep the PG term on the top rho of valid tokens by entropy (0: the top token only)
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
    # --- composition: objective x importance level x controls (docs/losses.md, "Composing") ---
    objective: Optional[str] = None  # clip | plain | cispo | sapo | gmpo | vespo | gpg
    is_level: Optional[str] = None  # token | sequence (GSPO: length-normalised sequence ratio, GSPO-token form)
    controls: Optional[tuple] = None  # any of CONTROLS; a comma-separated string is accepted
    cispo_clip: Optional[str] = None  # upper (TRL/Liger: w = min(r, cispo_max)) | two_sided (verl: clip(r, 1-eps_low, 1+eps_high))
    cispo_max: Optional[float] = None
    sapo_tau_pos: Optional[float] = None  # SAPO gate temperature for a > 0
    sapo_tau_neg: Optional[float] = None  # ... and for a <= 0
    vespo_k_pos: Optional[float] = None  # VESPO gamma weight phi(w) = e^lambda w^k e^(-lambda w), a >= 0
    vespo_lambda_pos: Optional[float] = None
    vespo_k_neg: Optional[float] = None  # ... a < 0
    vespo_lambda_neg: Optional[float] = None
    delta: Optional[float] = None  # INTELLECT-2 two-sided clip: the unclipped ratio is capped at delta (None = off)
    kl_bias_correction: Optional[bool] = None  # DeepSeek-V3.2: the KL term weighted by the importance ratio
    entropy_target: Optional[float] = None  # adaptive entropy_coef (TRL's): None = a fixed entropy_coef
    entropy_coef_min: Optional[float] = None
    entropy_coef_max: Optional[float] = None
    entropy_coef_step: Optional[float] = None  # TRL's entropy_coef_delta
    off_policy_mask: Optional[float] = None  # DeepSeek-V3.2 sequence mask: drop a < 0 responses with mean KL > this
    rollout_is: Optional[str] = None  # None | token_truncate | token_mask | sequence_truncate | sequence_mask
    rollout_is_min: Optional[float] = None  # bounds of the rollout IS weight exp(old - rollout); None = unbounded
    rollout_is_max: Optional[float] = None
    entropy_adv_alpha: Optional[float] = None  # entropy_advantage: a' = a + min(alpha sg(H), |a| / kappa)
    entropy_adv_kappa: Optional[float] = None
    archer_rho: Optional[float] = None  # archer: fraction of each response's tokens treated as high-entropy
    archer_eps: Optional[float] = None  # archer: clip half-width of the high-entropy tokens (no KL there)

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        knobs = {name: value for control in registry.ordered() for name, value in control.knobs.items()}
        preset = {**BASE_DEFAULTS, **knobs, **METHOD_DEFAULTS[self.method]}
        if isinstance(self.controls, str):
            self.controls = tuple(c.strip() for c in self.controls.split(",") if c.strip())
        elif isinstance(self.controls, list):
            self.controls = tuple(self.controls)
        explicit_controls = self.controls
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if explicit_controls is not None:
            missing = [c for c in preset["controls"] if c not in explicit_controls]
            if missing:
                raise ValueError(
                    f"LossConfig(method={self.method!r}) is built on the control(s) {missing}, which "
                    f"controls={explicit_controls!r} leaves out; add them, or start from a plain method "
                    f"(e.g. method='dapo') to compose without them"
                )
        self._validate()
        self._validate_composition()

    def replace(self, **changes) -> "LossConfig":
        """A copy with some knobs changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def _validate(self):
        _choice("adv_estimator", self.adv_estimator, ADV_ESTIMATORS)
        _choice("agg", self.agg, AGGREGATIONS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("backend", self.backend, backends.BACKENDS)
        for name in ("dual_clip", "check_inputs", "inplace_grad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LossConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _numbers(self, "eps_low", "eps_high", "dual_clip_c", "kl_coef", "entropy_coef", "temperature")
        if self.support is not None and not isinstance(self.support, Support):
            raise TypeError(f"LossConfig.support must be an erpo.Support(top_k=, top_p=, min_p=) or None, got "
                            f"{self.support!r}")
        _choice("support_entropy", self.support_entropy, ("full", "support"))
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
        if self.max_len is not None:
            _integer("max_len", self.max_len, 1)

    def _validate_composition(self):
        _choice("objective", self.objective, OBJECTIVES)
        _choice("is_level", self.is_level, IS_LEVELS)
        _choice("cispo_clip", self.cispo_clip, CISPO_CLIPS)
        known = registry.names()
        if not isinstance(self.controls, tuple):
            raise TypeError(f"LossConfig.controls must be a tuple of names from {known} (or a comma-separated "
                            f"string), got {self.controls!r}")
        for control in self.controls:
            _choice("controls", control, known)
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"LossConfig.controls names a control twice: {self.controls}")
        if self.rollout_is is not None:
            _choice("rollout_is", self.rollout_is, ROLLOUT_IS_MODES)
        if not isinstance(self.kl_bias_correction, bool):
            raise TypeError(f"LossConfig.kl_bias_correction must be a bool, got {self.kl_bias_correction!r}")
        _numbers(self, "cispo_max", "sapo_tau_pos", "sapo_tau_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg", "entropy_coef_min", "entropy_coef_max", "entropy_coef_step")
        _numbers(self, *(n for n in ("delta", "entropy_target", "off_policy_mask", "rollout_is_min", "rollout_is_max")
                         if getattr(self, n) is not None))
        for name in ("cispo_max", "sapo_tau_pos", "sapo_tau_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")

        objective, controls = self.objective, set(self.controls)
        for control in registry.ordered():
            control.check and control.check(self)  # its knobs always, the combination when it is enabled
            for other in control.excludes if control.name in controls else ():
                if other in controls:
                    raise ValueError(f"LossConfig.controls: {control.name!r} and {other!r} are alternative forms of "
                                     f"one control (pick one), got {self.controls}")
        if not spec(objective).token_advantage:
            shaping = [c.name for c in registry.ordered(sorted(controls)) if c.shapes_tokens]
            if shaping:
                raise ValueError(f"LossConfig.objective='gmpo' takes one advantage and one geometric-mean ratio per "
                                 f"response; the token-level control(s) {shaping} cannot apply to it")
            if self.is_level == "sequence":
                raise ValueError("LossConfig.objective='gmpo' is already sequence-level; is_level must be 'token'")
        if objective == "vespo":
            if self.is_level == "sequence":
                raise ValueError("LossConfig.objective='vespo' computes its own sequence weight; is_level must be 'token'")
            if self.rollout_is is not None and self.rollout_is.startswith("sequence"):
                raise ValueError("LossConfig.objective='vespo' folds token-level rollout IS weights into its sequence "
                                 f"weight (TRL's rule): rollout_is must be token_truncate or token_mask, got {self.rollout_is!r}")
        if objective in ("gpg", "vespo") and self.is_level == "sequence":
            raise ValueError(f"LossConfig.objective={objective!r} has no importance ratio; is_level must be 'token'")
        if self.delta is not None:
            if objective != "clip":
                raise ValueError(f"LossConfig.delta (two-sided clip) applies to objective='clip' only, got {objective!r}")
            if self.delta <= 1.0 + self.eps_high:
                raise ValueError(f"LossConfig.delta must be > 1 + eps_high = {1 + self.eps_high} (it caps ratios above "
                                 f"the clip range), got {self.delta}")
        if self.dual_clip and objective != "clip":
            raise ValueError(f"LossConfig.dual_clip applies to objective='clip' only, got {objective!r}")
        if self.kl_bias_correction and self.kl_coef == 0:
            raise ValueError("LossConfig.kl_bias_correction weights the KL term, but kl_coef is 0 (no KL term)")
        if self.entropy_target is not None:
            if self.entropy_target < 0:
                raise ValueError(f"LossConfig.entropy_target must be >= 0 (an entropy), got {self.entropy_target}")
            # entropy_coef may sit below entropy_coef_min: the controller applies 0 while entropy is above target
            if not (0 <= self.entropy_coef_min <= self.entropy_coef_max and 0 <= self.entropy_coef <= self.entropy_coef_max):
                raise ValueError(f"adaptive entropy (entropy_target set) needs 0 <= entropy_coef_min <= entropy_coef_max "
                                 f"and 0 <= entropy_coef <= entropy_coef_max, got {self.entropy_coef_min}, "
                                 f"{self.entropy_coef}, {self.entropy_coef_max}")
            if self.entropy_coef_step <= 0:
                raise ValueError(f"LossConfig.entropy_coef_step must be > 0, got {self.entropy_coef_step}")
        if self.off_policy_mask is not None and self.off_policy_mask < 0:
            raise ValueError(f"LossConfig.off_policy_mask (a KL threshold) must be >= 0, got {self.off_policy_mask}")
        if self.rollout_is is not None:
            low, high = self.rollout_is_min, self.rollout_is_max
            if low is None and high is None:
                raise ValueError(f"LossConfig.rollout_is={self.rollout_is!r} needs rollout_is_min or rollout_is_max")
            if (low is not None and low < 0) or (high is not None and high <= 0):
                raise ValueError(f"LossConfig.rollout_is_min must be >= 0 and rollout_is_max > 0, got {low}, {high}")
            if low is not None and high is not None and not low < high:
                raise ValueError(f"LossConfig.rollout_is_min ({low}) must be < rollout_is_max ({high})")

    @property
    def needs_ref(self) -> bool:
        """Whether the batch must carry ref_logp."""
        return self.kl_coef > 0 or any(c.needs_ref and c.needs_ref(self) for c in registry.ordered(self.controls))

    @property
    def needs_rollout(self) -> bool:
        """Whether the batch must carry rollout_logp (the inference engine's log-probs)."""
        return self.rollout_is is not None

    def entropy_reason(self) -> str:
        """Why this config reads the entropy ('' when it does not)."""
        reasons = [f"control {c!r}" for c in self.controls if registry.REGISTRY[c].reads_entropy]
        if self.entropy_coef != 0:
            reasons.append(f"entropy_coef={self.entropy_coef}")
        if self.entropy_target is not None:
            reasons.append(f"entropy_target={self.entropy_target}")
        return ", ".join(reasons)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss or its controller reads the per-token entropy (token_policy_loss then needs it)."""
        return bool(self.entropy_reason())

    @property
    def needs_groups(self) -> bool:
        """Whether the batch must carry group_ids (ERPO's gate normalizes within groups)."""
        return any(c.needs_groups for c in registry.ordered(self.controls))

    @functools.cached_property
    def row_local(self) -> bool:
        """Whether each token's loss coefficient depends only on its own logp and entropy and on per-sequence
        constants (the one-pass fused-head schedule is then exact): a row-local objective at token level, no
        control with a per-token step, no correction that reads the whole response."""
        return (spec(self.objective).row_local and self.is_level == "token" and self.rollout_is is None
                and self.off_policy_mask is None and all(c.row_local for c in registry.ordered(self.controls)))


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LossConfig))
_dataclass_init = LossConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_fields(self, *args, **kwargs):
    """The dataclass's __init__, but a misspelt keyword names the field it probably meant."""
    for key in kwargs:
        if key not in _FIELD_NAMES:
            raise TypeError(f"LossConfig: unknown field {key!r}{did_you_mean(key, _FIELD_NAMES)}; docs/losses.md "
                            "lists them all")
    _dataclass_init(self, *args, **kwargs)


LossConfig.__init__ = _init_naming_unknown_fields
