"""Time the fused head over the sampler's truncated support against the full head (CPU, one process).

    python -m bench.support [--n 4096 --hidden 1024 --vocab 32000 --k 64 --top-p 0.8 --threads 1 --repeats 2]

Forward + backward of `erpo.linear_logprobs_and_entropy` (logp and entropy from the hidden states, fp32): the full
vocabulary, replay of K kept ids per token, and recompute with top-p. Prints the best of `repeats` wall times of
each, their ratios to the full head, and the machine, versions, load and date the numbers belong to.
"""
import argparse
import os
import platform
import time

import torch

import erpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("n", 4096), ("hidden", 1024), ("vocab", 32000), ("k", 64), ("threads", 1), ("repeats", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--top-p", type=float, default=0.8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.hidden, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 3 / args.hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.n,), generator=gen)
    ids = torch.randint(0, args.vocab, (args.n, args.k), generator=gen)
    ids[:, 0] = targets

    def once(**kwargs) -> float:
        start = time.perf_counter()
        logp, entropy = erpo.linear_logprobs_and_entropy(hidden, weight, targets, **kwargs)
        (logp.sum() + entropy.sum()).backward()
        hidden.grad = weight.grad = None
        return time.perf_counter() - start

    cases = (("full vocabulary", {}), (f"replay K = {args.k}", {"support_ids": ids}),
             (f"recompute top-p {args.top_p}", {"support": erpo.Support(top_p=args.top_p)}))
    times = {name: min(once(**kwargs) for _ in range(args.repeats)) for name, kwargs in cases}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# N = {args.n}, H = {args.hidden}, V = {args.vocab}, fp32, forward + backward, best of {args.repeats}")
    full = times["full vocabulary"]
    for name, seconds in times.items():
        print(f"{name:>24}: {seconds:7.2f} s  ({seconds / full:.3f}x the full head)")


if __name__ == "__main__":
    main()
