"""Compile the Triton kernels for a real GPU target (sm_90) without a GPU.

The interpreter accepts code that the GPU compiler rejects (dtype mismatches in tl.dot, shape rules,
scalar/tensor control flow), so this compiles representative variants ahead of time down to a cubin
with triton's bundled ptxas. The compilation runs in a subprocess without TRITON_INTERPRET (the
conftest turns the interpreter on for this process). Run this file directly to compile every variant.
"""

import itertools
import os
import subprocess
import sys

import pytest


def _toolchain_present() -> bool:
    try:
        import triton.knobs

        return os.path.exists(triton.knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001 - no nvidia backend in this triton build
        return False


def _variants(full: bool):
    """(kernel name, pointer dtypes, constexprs) to compile; ``full`` sweeps every bit width."""
    bits_list = (2, 3, 4, 8) if full else (3,)
    for bits in bits_list:
        yield "dense_splitk_kernel", {"act": "bf16", "plane": "fp32"}, dict(
            BITS=bits, HAS_ZEROS=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4,
            USE_DOT=False, DOT_FP32=False, EVEN_K=False)
        yield "dense_tiled_kernel", {"act": "bf16", "plane": "bf16"}, dict(
            BITS=bits, HAS_ZEROS=bits != 3, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, DOT_FP32=False,
            EVEN_K=True)
        yield "moe_gate_up_kernel", {"act": "bf16", "plane": "bf16"}, dict(
            BITS=bits, HAS_ZEROS=True, HAS_BIAS=True, GATED=True, ACT=4, DECODE=False, BLOCK_M=16, BLOCK_N=64,
            BLOCK_K=64, USE_DOT=True, DOT_FP32=False, EVEN_K=False)
        yield "moe_down_kernel", {"act": "bf16", "plane": "bf16"}, dict(
            BITS=bits, HAS_ZEROS=False, HAS_BIAS=True, DECODE=True, BLOCK_M=1, BLOCK_N=64, BLOCK_K=64,
            USE_DOT=False, DOT_FP32=False, EVEN_K=bits % 2 == 0)
    yield "dense_splitk_kernel", {"act": "fp32", "plane": "fp32"}, dict(
        BITS=8, HAS_ZEROS=False, HAS_BIAS=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=2,
        USE_DOT=True, DOT_FP32=True, EVEN_K=True)
    if full:
        for act, gated, decode in itertools.product(range(4), (True, False), (True, False)):
            yield "moe_gate_up_kernel", {"act": "fp16", "plane": "fp16"}, dict(
                BITS=4, HAS_ZEROS=False, HAS_BIAS=False, GATED=gated, ACT=act, DECODE=decode,
                BLOCK_M=1 if decode else 32, BLOCK_N=64, BLOCK_K=64, USE_DOT=not decode, DOT_FP32=False, EVEN_K=gated)


def compile_variants(full: bool) -> int:
    """Compile for sm_90; returns how many variants compiled (raises on the first failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moecompress.kernels import triton_kernels

    count = 0
    for name, dtypes, constexprs in _variants(full):
        fn = getattr(triton_kernels, name)
        act, plane = dtypes["act"], dtypes["plane"]
        pointers = {
            "x_ptr": f"*{act}", "inter_ptr": f"*{act}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
            "bias_ptr": "*fp32", "out_ptr": f"*{plane}", "topk_weights_ptr": "*bf16",
        }
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in pointers:
                signature[arg] = pointers[arg]
            elif arg.endswith("_ptr"):
                signature[arg] = "*i32"  # routing metadata
            else:
                signature[arg] = "fp32" if arg in ("alpha", "limit") else "i32"
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), f"{name} {constexprs}: no cubin"
        count += 1
    return count


@pytest.mark.skipif(not _toolchain_present(), reason="triton's nvidia backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout


if __name__ == "__main__":
    print(f"compiled {compile_variants(full='--full' in sys.argv)} kernel variants for sm_90")
