"""Where erpo._C is not built (every CPU machine), backend="cuda" fails with what to do about it."""
import importlib.util

import pytest
import torch

from erpo.ops import cuda_logprobs_entropy
from erpo.ops.row_layout import row_layout

BUILT = importlib.util.find_spec("erpo._C") is not None


@pytest.mark.skipif(BUILT, reason="erpo._C is built here: tests/ops run backend='cuda' instead")
@pytest.mark.parametrize("call", ("forward", "backward"))
def test_missing_extension_says_how_to_build_it(call):
    logits = torch.randn(2, 5)
    targets = torch.tensor([1, 2])
    layout = row_layout(logits)
    stats = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"ERPO_BUILD_CUDA=1 pip install -e \. --no-build-isolation"):
        if call == "forward":
            cuda_logprobs_entropy.forward(layout, targets, 1.0, -100)
        else:
            cuda_logprobs_entropy.backward(layout, targets, stats, stats, stats, None, 1.0, -100, layout)
    assert not cuda_logprobs_entropy.is_available()
