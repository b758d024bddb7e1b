"""DAPO's dynamic sampling: a group whose rewards are all equal has zero advantage and teaches nothing, so it
is dropped and more prompts are sampled until the batch holds `prompts_per_step` informative groups.

Each round samples `prompts_per_step` fresh prompts (verl's gen_batch_size = train batch size) and keeps
their informative groups, in order, up to the number still missing. After `max_tries` rounds a batch still
short is topped up with dropped groups (zero advantage; reported as filler_groups), so every step, and every
rank under torchrun, trains on the same number of groups.
"""
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Group:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    finished: list[bool]
    rewards: list[float]  # what the advantages are computed from (task reward + shaping)
    task_rewards: list[float]  # the task's own reward (the `reward` metric)


@dataclass
class Collected:
    groups: list[Group]
    tries: int = 1
    dropped: int = 0  # all-equal groups left out of the batch
    filler: int = 0  # dropped groups put back to fill a batch still short after max_tries
    sampled: list[Group] = field(default_factory=list)  # every group drawn this step


def informative(group: Group) -> bool:
    return max(group.rewards) > min(group.rewards)


def collect(draw: Callable[[], list[Group]], n_groups: int, enabled: bool, max_tries: int,
            everyone_full: Callable[[bool], bool] = lambda full: full) -> Collected:
    """`draw()` samples one round of groups. Without `enabled`, one round is the batch as it comes.
    `everyone_full(full)` tells whether every rank's batch is full: ranks draw the same number of rounds, so
    their prompt samplers stay in step (each rank takes its own slice of the same draws)."""
    first = draw()
    if not enabled:
        return Collected(groups=first, sampled=list(first))
    kept, left_out, sampled, tries = [], [], [], 0
    round_groups = first
    while True:
        tries += 1
        sampled.extend(round_groups)
        for group in round_groups:
            (kept if informative(group) and len(kept) < n_groups else left_out).append(group)
        if everyone_full(len(kept) >= n_groups) or tries >= max_tries:
            break
        round_groups = draw()
    dropped_all_equal = [g for g in left_out if not informative(g)]
    filler = dropped_all_equal[: n_groups - len(kept)]
    return Collected(groups=kept + filler, tries=tries, dropped=len(dropped_all_equal) - len(filler),
                     filler=len(filler), sampled=sampled)
