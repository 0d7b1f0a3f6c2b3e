"""4-bit blocks decoded on CPU into a reused buffer instead of a fresh tensor every call.

bitsandbytes' CPU `dequantize_4bit` kernel is fast, but its op allocates its output each time, and has no `.out`
variant on CPU (0.50.2: only CUDA registers one). On CPU an allocation of more than 32 MiB (glibc's largest mmap
threshold) is a fresh mmap whose every page the kernel zero-fills on first touch, so decoding one layer's routed
experts into a new tensor costs more in page faults than in decoding: measured on a fine-grained stack
`[64, 256, 512]` fp32 (33.5 MB), 10.8 ms through the op, 1.3 ms into a buffer that is already resident (the same
values, bit for bit). A training step decodes each layer twice (forward and the backward recompute).

So the routed 4-bit path (`moetune.quantized_experts`) decodes into one workspace per dtype that lives as long as
the process and is at most as large as one run of routed experts (`DEQUANT_CHUNK_BYTES`, 64 MiB, or one expert
when that is larger): the memory the decode needed at its peak anyway, now kept. It is only ever read inside one
grouped matmul and never saved for backward, so reusing it is safe. On GPUs the caching allocator already reuses
memory, and there the op is used as before.

The kernel is reached through bitsandbytes' C library (the same functions its CPU op calls, with the same
arguments), so this is pinned to the bitsandbytes versions it was checked against (`TESTED_VERSIONS`); any other
version, a CPU without the compiled library, or a case the op itself sends to its slow path uses the op.
"""

import ctypes

import torch


TESTED_VERSIONS = ("0.50.",)  # checked bit for bit against the op: tests/test_quantized_experts.py
_KERNELS = {  # bitsandbytes/backends/cpu/ops.py `dequantize_4bit`, 0.50.2
    ("nf4", torch.float32): "cdequantize_blockwise_cpu_nf4_fp32",
    ("nf4", torch.bfloat16): "cdequantize_blockwise_cpu_nf4_bf16",
    ("nf4", torch.float16): "cdequantize_blockwise_cpu_nf4_fp16",
    ("fp4", torch.float32): "cdequantize_blockwise_cpu_fp4_fp32",
    ("fp4", torch.bfloat16): "cdequantize_blockwise_cpu_fp4_bf16",
    ("fp4", torch.float16): "cdequantize_blockwise_cpu_fp4_fp16",
}
_workspaces: dict[torch.dtype, torch.Tensor] = {}
_library = None


def _native_library():
    """bitsandbytes' C library when its version is one this was tested with, else None (looked up once)."""
    global _library
    if _library is None:
        _library = False
        try:
            import bitsandbytes
            from bitsandbytes.cextension import lib
        except ImportError:
            return None
        if bitsandbytes.__version__.startswith(TESTED_VERSIONS) and all(hasattr(lib, n) for n in _KERNELS.values()):
            _library = lib
    return _library or None


def _direct_kernel(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, dtype: torch.dtype):
    if packed.device.type != "cpu" or not packed.is_contiguous() or not absmax.is_contiguous():
        return None
    # The op's own slow-path conditions (bitsandbytes 0.50.2): AVX-512 with blocks of 2048 or more.
    if blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return None
    name = _KERNELS.get((quant_type, dtype))
    lib = _native_library() if name else None
    return getattr(lib, name) if lib is not None else None


def workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU buffer of at least `numel` elements of `dtype`, the same one on every call (grown when needed)."""
    buffer = _workspaces.get(dtype)
    if buffer is None or buffer.numel() < numel:
        _workspaces.pop(dtype, None)  # free the smaller one first
        buffer = _workspaces[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_workspaces() -> None:
    """Free the decode buffers (they come back on the next decode)."""
    _workspaces.clear()


def decode_rows(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, rows: int, length: int,
                dtype: torch.dtype, *, reuse: bool) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` of `rows x length` values (whole blocks per row) as a `[rows, length]` tensor.

    With `reuse` on CPU, the result lives in the shared workspace: valid until the next reusing decode of this
    dtype, so the caller must be done with it by then and must not keep it.
    """
    absmax = absmax.float()
    kernel = _direct_kernel(packed, absmax, blocksize, quant_type, dtype) if reuse and length % 2 == 0 else None
    if kernel is None:
        return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, [rows, length], dtype)
    out = workspace(rows * length, dtype).view(rows, length)
    packed = packed.view(torch.uint8)
    kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
           ctypes.c_longlong(blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(length))
    return out
