"""REPO (Petrenko et al. 2026): a' = a - beta sg(logp + H)."""
from erpo.losses.controls import Control, lazy, numbers, on_advantage

torch, lib = lazy("torch"), lazy("erpo.losses.shaping")


def repo(config, tokens, base):
    shifted = base - config.repo_beta * (tokens.logp + tokens.entropy)
    return lib.Shaping(adv=torch.where(tokens.valid, shifted, torch.zeros_like(base)))


def naive(config, d) -> None:
    d.a = torch.where(d.mask, d.a - config.repo_beta * (d.lp + d.H), torch.zeros_like(d.a))


CONTROL = Control(
    name="repo", order=30, check=lambda config: numbers(config, "repo_beta"), reads_entropy=True,
    excludes=("repo_r",), knobs=dict(repo_beta=0.05), apply=on_advantage(repo), naive=naive,
)
