"""`did_you_mean`: the hint every one-line error about a misspelt name ends with (stdlib only, imported by the
command line before torch)."""
import difflib


def did_you_mean(word, choices, aliases: dict | None = None) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''. Case is ignored ('ERPO' -> 'erpo'); `aliases`
    maps names other tools use to ours ('learning_rate' -> 'lr'), which spelling alone would never find."""
    choices = [str(c) for c in choices]
    word = str(word)
    folded = {c.lower(): c for c in choices}
    key = word.lower().replace("-", "_")
    if aliases and key in aliases:
        return f" (did you mean {aliases[key]!r}?)"
    if key in folded:
        return f" (did you mean {folded[key]!r}?)"
    close = difflib.get_close_matches(key, list(folded), n=1)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""
