"""The bench's "linear" kind (policy losses from hidden states + LM head): its plan on CPU and GPU and the
defaults of `python -m bench` (the end-to-end run is in test_bench_quick.py)."""
from bench import __main__ as cli
from bench import cases, runner
from bench.inputs import Shape
from bench.presets import PRESETS


def _planned(preset, device):
    items = runner.plan(preset.linear_shapes, device, kinds=("linear",), preset_skip=preset.skip)
    return {(it["case"], it["method"], it.get("status")) for it in items}, items


def test_gpu_linear_plan_has_the_fused_heads_and_peers():
    planned, items = _planned(PRESETS["gpu"], "cuda")
    assert {(s.n_tokens, s.vocab, s.dtype, s.hidden_size) for s in PRESETS["gpu"].linear_shapes} >= {
        (8192, 151936, "bfloat16", 4096)}
    for method in cases.LINEAR_METHODS:
        for case in ("naive", "erpo", "erpo-head-torch"):
            assert (case, method, None) in planned
    assert ("erpo-head-torch-2pass", "dapo", None) in planned and ("erpo-head-torch-2pass", "kl_cov", None) not in planned
    # Liger is planned for DAPO (run where installed, else listed with the reason it was skipped), never for KL-Cov.
    assert any(c == "liger-fused-linear" and m == "dapo" for c, m, _ in planned)
    assert not any(c == "liger-fused-linear" and m == "kl_cov" for c, m, _ in planned)
    assert all(it["hidden_size"] == 4096 for it in items)


def test_cpu_linear_plan_is_the_issue_shape_and_skips_gpu_cases():
    planned, _ = _planned(PRESETS["cpu"], "cpu")
    assert PRESETS["cpu"].linear_shapes == (Shape(4096, 32000, "float32", 1024),)
    assert ("erpo-head-triton", "dapo", "skipped") in planned
    assert ("erpo-head-torch", "dapo", None) in planned


def test_linear_kind_is_a_default_only_with_its_own_shapes():
    # The linear shapes carry H: an --n/--v override without --hidden leaves the kind out unless asked for.
    assert cli._shapes(PRESETS["cpu"], cli.parse([])) is None
    assert cli.selected_kinds(cli.parse([])) == ("op", "loss", "linear")
    assert cli.selected_kinds(cli.parse(["--n", "512"])) == ("op", "loss")
    assert cli.selected_kinds(cli.parse(["--n", "512", "--kinds", "linear"])) == ("linear",)
    args = cli.parse(["--n", "512", "--v", "1000", "--dtypes", "float32", "--hidden", "64"])
    assert cli.selected_kinds(args) == ("op", "loss", "linear")
    assert cli._shapes(PRESETS["cpu"], args) == (Shape(512, 1000, "float32", 64),)


def test_trls_fused_head_is_a_linear_peer_on_cpu_and_gpu():
    for preset, device in (("cpu", "cpu"), ("gpu", "cuda")):
        planned, _ = _planned(PRESETS[preset], device)
        assert ("trl-chunked", "dapo", None) in planned and ("trl-chunked", "kl_cov", None) in planned, preset


def test_trls_fused_head_gives_naives_loss_and_gradients():
    import torch

    from bench.inputs import Inputs

    inputs = Inputs(Shape(48, 301, "float32", 24), "cpu", seed=0)
    batch = inputs.linear_batch()
    for method in ("dapo",):  # row-local; kl_cov goes through the same head and the same [N] middle
        results = []
        for name in ("naive", "trl-chunked"):
            hidden, weight = inputs.hidden(), inputs.weight()
            loss = cases.build_linear(name, method, batch)(hidden, weight)
            results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
        for ours, theirs in zip(*results):
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6), method
