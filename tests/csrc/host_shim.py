"""Build csrc/host_shim.cpp with g++ and wrap its C API for the tests (ctypes on tensors' data_ptr())."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2}  # erpo_dtype of csrc/logprobs_entropy.h

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int


def build(out_dir: Path) -> ctypes.CDLL:
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("g++ not found: the host tests of csrc/softmax_row_math.h need a C++ compiler")
    library = out_dir / "liberpo_host_shim.so"
    cmd = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{CSRC}",
           str(CSRC / "host_shim.cpp"), "-o", str(library)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"building the host shim failed ({' '.join(cmd)}):\n{done.stderr}")
    lib = ctypes.CDLL(str(library))
    lib.erpo_host_rows_fwd.argtypes = [_ptr, _int, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _i64,
                                       _int]
    lib.erpo_host_rows_bwd.argtypes = [_ptr, _int, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
                                       _i64, _i64, _f32, _i64, _int]
    lib.erpo_host_chunked_row.argtypes = [_ptr, _i64, _f32, _i64, _i64, _ptr, _i64, _int, _int, _ptr]
    lib.erpo_host_split_row.argtypes = [ctypes.c_uint64, ctypes.c_uint64, _i64, _int, _ptr]
    lib.erpo_host_split_row.restype = None
    lib.erpo_host_default_block_threads.argtypes = [_i64, _int]
    lib.erpo_host_set_exp2_error.argtypes = [_f32]
    lib.erpo_host_set_exp2_error.restype = None
    lib.erpo_host_token_terms.argtypes = [_ptr] * 17 + [_i64] + [_f32] * 11 + [_int] * 6
    lib.erpo_host_token_terms.restype = None
    return lib


def _ptr_or_none(tensor):
    return None if tensor is None else tensor.data_ptr()


def rows_fwd(lib, layout, targets, inv_temperature, ignore_index, threads):
    """The forward kernel's code on the host: flat float32 (logp, entropy, lse) for a RowLayout."""
    n = layout.n_rows
    logp, entropy, lse = (torch.empty(n, dtype=torch.float32) for _ in range(3))
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    rc = lib.erpo_host_rows_fwd(
        layout.tensor.data_ptr(), DTYPE_CODES[layout.tensor.dtype], layout.stride_outer, layout.stride_inner,
        layout.inner, targets.data_ptr(), logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(), n, layout.vocab,
        inv_temperature, ignore_index, threads,
    )
    assert rc == 0
    return logp, entropy, lse


def rows_bwd(lib, layout, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, grad_layout,
             threads):
    """The backward kernel's code on the host: writes dlogits into grad_layout.tensor (may be layout.tensor)."""
    assert grad_layout.tensor.dtype == layout.tensor.dtype
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    rc = lib.erpo_host_rows_bwd(
        layout.tensor.data_ptr(), DTYPE_CODES[layout.tensor.dtype], layout.stride_outer, layout.stride_inner,
        layout.inner, grad_layout.tensor.data_ptr(), grad_layout.stride_outer, grad_layout.stride_inner,
        targets.data_ptr(), lse.data_ptr(), entropy.data_ptr(), _ptr_or_none(grad_logp), _ptr_or_none(grad_entropy),
        layout.n_rows, layout.vocab, inv_temperature, ignore_index, threads,
    )
    assert rc == 0


def chunked_row(lib, row, inv_temperature, target, chunk, order, group, tree):
    """(logp, entropy, lse) of one float32 row folded chunk by chunk, the chunk states merged in `order`."""
    row = row.contiguous()
    order = torch.as_tensor(order, dtype=torch.int64).contiguous()
    out = torch.empty(3, dtype=torch.float32)
    rc = lib.erpo_host_chunked_row(row.data_ptr(), row.numel(), inv_temperature, target, chunk, order.data_ptr(),
                                   order.numel(), group, int(tree), out.data_ptr())
    assert rc == 0
    return out


def split_row(lib, read_address, vocab, elem_size, write_address=0):
    out = (ctypes.c_int64 * 3)()
    lib.erpo_host_split_row(read_address, write_address, vocab, elem_size, out)
    return tuple(out)


def token_terms(lib, logp, entropy, old, adv, ref, klcov_w, params, extras=None):
    """The per-token policy-loss kernel's code on the host: (loss, dlogp, dentropy, clip_low, clip_high).
    `extras`: a TokenExtras or None; the scalars and codes as erpo/ops/cuda_token_loss.token_terms passes them."""
    from erpo.ops.cuda_token_loss import token_kernel_args

    arrays, scalars, codes = token_kernel_args(logp, entropy, old, adv, ref, klcov_w, params, extras)
    arrays = [None if t is None else t.to(torch.float32).contiguous() for t in arrays]
    n = arrays[0].numel()
    out = [torch.empty(n, dtype=torch.float32) for _ in range(3)]
    flags = [torch.empty(n, dtype=torch.int8) for _ in range(2)]
    lib.erpo_host_token_terms(*(_ptr_or_none(t) for t in arrays), *(t.data_ptr() for t in out + flags), n,
                              *scalars, *codes)
    return (*out, flags[0].bool(), flags[1].bool())
