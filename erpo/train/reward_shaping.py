"""DAPO's overlong reward shaping (Yu et al. 2025, eq. 13), added to the task reward before advantages.

    penalty(L) = 0                                   L <= L_max - L_cache
               = (L_max - L_cache - L) / L_cache * f   L_max - L_cache < L <= L_max

with L_max = max_new_tokens, L_cache = `overlong_buffer`, f = `overlong_penalty`; L counts the response's
tokens, EOS included (verl's valid response length). Responses never exceed max_new_tokens here, so the
paper's third case (-f beyond L_max) is the value at L = L_max.
"""


def overlong_penalties(lengths: list[int], max_new_tokens: int, buffer: int, factor: float) -> list[float]:
    if buffer <= 0:
        return [0.0] * len(lengths)
    expected = max_new_tokens - buffer
    return [min(0.0, (expected - length) / buffer * factor) for length in lengths]
