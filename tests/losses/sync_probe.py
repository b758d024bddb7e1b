"""A dispatcher-level probe for host syncs: it sees every ATen op the loss runs, whoever calls it.

A Python-level patch of `Tensor.item` misses syncs that happen in C++ (indexing with a 0-d tensor calls
`aten::_local_scalar_dense` from the indexing code, boolean-mask indexing calls nonzero). This probe is a
`TorchDispatchMode`: it raises on the ops that read a device value back to the host (or whose output shape
depends on the data, which needs the same read), and it descends into erpo's own `torch.library` custom ops
by running their Python bodies under the probe, so their internals are checked too. `Tensor.tolist`,
`.numpy()` and `.cpu()` read CPU memory without an ATen op, so while the probe is active they raise too.
"""
import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result the host must wait for: a scalar read, or an output size that depends on values.
SYNCING_OPS = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique_consecutive",
    "_unique", "_unique2", "unique_dim", "bincount", "histc",
}


class HostSync(AssertionError):
    pass


# Tensor methods that copy to the host without a dispatched op on a CPU tensor.
HOST_READS = ("tolist", "numpy", "cpu")


class HostSyncProbe(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen_erpo_ops = []
        self._saved = {}

    def __enter__(self):
        for name in HOST_READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._host_read(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved = {}
        return super().__exit__(*exc)

    def _host_read(self, name):
        def read(tensor, *args, **kwargs):
            self.on_sync(f"Tensor.{name}")
            return self._saved[name](tensor, *args, **kwargs)
        return read

    def on_sync(self, what: str) -> None:
        raise HostSync(f"host sync: {what} on the hot path")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        if namespace == "aten":
            if name in SYNCING_OPS:
                self.on_sync(f"aten::{name}")
            if name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
                self.on_sync("aten::repeat_interleave with tensor repeats and no output_size")
            if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
            ):
                self.on_sync(f"aten::{name} with a boolean mask (a nonzero inside)")
        if namespace == "erpo":
            self.seen_erpo_ops.append(name)
            body = custom_ops.OPDEFS[func._schema.name]._init_fn
            with _Reenter(self):  # run the op's own Python body under the probe, so its internals are checked too
                return body(*args, **kwargs)
        return func(*args, **kwargs)


class _Reenter:
    """Push the probe's dispatch mode again without re-patching the Tensor methods (still patched)."""

    def __init__(self, probe):
        self.probe = probe

    def __enter__(self):
        return TorchDispatchMode.__enter__(self.probe)

    def __exit__(self, *exc):
        return TorchDispatchMode.__exit__(self.probe, *exc)
