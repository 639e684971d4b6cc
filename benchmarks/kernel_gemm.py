"""GPU benchmark of the dequant-GEMM kernels against the baselines of KERNELS.md section 5.

    python benchmarks/kernel_gemm.py [--json] [--bits 4 3 mixed] [--batches 1 16 256] [--cudagraph]

Measures, in one run on one GPU:

* the copy bandwidth of the card (``dst.copy_(src)`` on 1 GiB), the practical roofline;
* MoE layers of Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B at each batch, uniform and Zipf-skewed
  routing (fixed seed): our grouped kernel (``moe_experts_forward``) vs a bf16 torch loop over
  experts, transformers' ``grouped_mm`` experts implementation (if importable) on bf16 weights, and
  dequantize-then-matmul (``format.dequantize`` of the touched experts, then the bf16 loop);
* single weights K x N (4096x28672, 14336x4096, 2048x1536, 768x2048): ``dequant_gemm`` vs bf16
  ``torch.matmul`` and dequantize-then-matmul.

Each measurement: median microseconds (``triton.testing.do_bench``, which flushes L2 between runs;
``--cudagraph`` uses ``do_bench_cudagraph``), touched bytes (weights of the experts the batch routes
to, in the implementation's own format, plus activations), effective GB/s, % of the measured copy
bandwidth, and speedups over each baseline. ``--json`` prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch

MOE_MODELS = {  # name: (E, k, H, I)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
}
DENSE_SHAPES = ((4096, 28672), (14336, 4096), (2048, 1536), (768, 2048))  # (K, N)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 256)
ROUTINGS = {"uniform": 0.0, "zipf": 1.2}
MIXED_BITS = (2, 3, 4, 8)  # "mixed": experts split into four width classes
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
    parser.add_argument("--bits", nargs="+", default=["4"], help="2, 3, 4, 8 or 'mixed'")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--models", nargs="+", default=list(MOE_MODELS), choices=list(MOE_MODELS))
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--cudagraph", action="store_true", help="time with do_bench_cudagraph (launch overhead hidden)")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per measurement")
    return parser.parse_args(argv)


class Bench:
    """Timing and reporting for one run (one device, one copy-bandwidth measurement)."""

    def __init__(self, args: argparse.Namespace):
        import triton.testing

        self.testing = triton.testing
        self.args = args
        self.copy_gbps = self.measure_copy_bandwidth()
        self.emit({"kind": "copy", "device": torch.cuda.get_device_name(), "gbps": round(self.copy_gbps, 1)})

    def time_us(self, fn) -> float:
        if self.args.cudagraph:
            return 1e3 * self.testing.do_bench_cudagraph(fn, rep=self.args.rep, return_mode="median")
        return 1e3 * self.testing.do_bench(fn, rep=self.args.rep, return_mode="median")

    def measure_copy_bandwidth(self) -> float:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        us = 1e3 * self.testing.do_bench(lambda: dst.copy_(src), rep=self.args.rep, return_mode="median")
        return 2 * src.numel() / (us * 1e-6) / 1e9  # read + write

    def emit(self, record: dict) -> None:
        if self.args.json:
            print(json.dumps(record), flush=True)
        elif record["kind"] == "copy":
            print(f"# {record['device']}: copy bandwidth {record['gbps']} GB/s", flush=True)
        else:
            speedups = " ".join(f"{k[11:]}={v:.2f}x" for k, v in record.items() if k.startswith("speedup_vs_"))
            print(
                f"{record['kind']:5} {record['shape']:>16} bits={record['bits']:>5} B={record['batch']:>3} "
                f"{record.get('routing', ''):>7} {record['impl']:>15}: {record['us']:9.1f} us "
                f"{record['gbps']:7.1f} GB/s {record['pct_copy_bw']:5.1f}% {speedups}",
                flush=True,
            )

    def report(self, base: dict, results: dict[str, tuple[float, int]]) -> None:
        """``results``: impl -> (microseconds, touched bytes); speedups relative to the baselines."""
        for impl, (us, nbytes) in results.items():
            gbps = nbytes / (us * 1e-6) / 1e9
            record = {**base, "impl": impl, "us": round(us, 2), "touched_bytes": nbytes, "gbps": round(gbps, 1),
                      "pct_copy_bw": round(100 * gbps / self.copy_gbps, 1)}
            for baseline in ("bf16", "grouped_mm", "dequant_matmul"):
                if baseline in results and baseline != impl:
                    record[f"speedup_vs_{baseline}"] = round(results[baseline][0] / us, 3)
            self.emit(record)


def packed_bytes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> int:
    return qweight.numel() * 4 + scales.numel() * 2 + (zeros.numel() if zeros is not None else 0)


def bits_plan(spec: str, num_experts: int) -> list[tuple[int, list[int]]]:
    """(bits, expert ids) per width class for a --bits value."""
    if spec == "mixed":
        return [(b, list(range(i, num_experts, len(MIXED_BITS)))) for i, b in enumerate(MIXED_BITS)]
    return [(int(spec), list(range(num_experts)))]


def bf16_moe_loop(x, topk_ids, topk_weights, gate_up, down):
    """The eager transformers loop on dense bf16 experts ``gate_up [E, 2I, H]``, ``down [E, H, I]``."""
    out = torch.zeros_like(x, dtype=torch.float32)
    inter = down.shape[-1]
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.where(topk_ids == expert)
        projected = x[tokens] @ gate_up[expert].t()
        hidden = torch.nn.functional.silu(projected[:, :inter]) * projected[:, inter:]
        out.index_add_(0, tokens, (hidden @ down[expert].t()).float() * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def dequant_then_loop(x, topk_ids, topk_weights, groups):
    """Dequantize-then-matmul baseline: dequantize every touched expert to bf16, then the loop."""
    from moecompress.quant import format as fmt

    out = torch.zeros_like(x, dtype=torch.float32)
    touched = set(torch.unique(topk_ids).tolist())
    for group in groups:
        for local, expert in enumerate(group.expert_ids.tolist()):
            if expert not in touched:
                continue
            tokens, slots = torch.where(topk_ids == expert)
            zeros_gu = None if group.gate_up.zeros is None else group.gate_up.zeros[local]
            zeros_dn = None if group.down.zeros is None else group.down.zeros[local]
            gate_up = fmt.dequantize(group.gate_up.qweight[local], group.gate_up.scales[local], zeros_gu,
                                     group.bits, group.group_size, torch.bfloat16)
            down = fmt.dequantize(group.down.qweight[local], group.down.scales[local], zeros_dn,
                                  group.bits, group.group_size, torch.bfloat16)
            projected = x[tokens] @ gate_up.t()
            inter = down.shape[-1]
            hidden = torch.nn.functional.silu(projected[:, :inter]) * projected[:, inter:]
            out.index_add_(0, tokens, (hidden @ down.t()).float() * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def grouped_mm_module(gate_up: torch.Tensor, down: torch.Tensor):
    """A module-like object for ``transformers.integrations.moe.grouped_mm_experts_forward``."""
    try:
        from transformers.integrations.moe import grouped_mm_experts_forward
    except ImportError:
        return None
    inter = down.shape[-1]
    module = types.SimpleNamespace(
        num_experts=gate_up.shape[0], gate_up_proj=gate_up, down_proj=down, has_gate=True, has_bias=False,
        is_transposed=False, has_post_expert_norm=False, _is_expert_parallel=False,
        act_fn=torch.nn.functional.silu,
    )
    module._apply_gate = lambda h: torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    return lambda x, ids, w: grouped_mm_experts_forward(module, x, ids, w)


def bench_moe(bench: Bench, args: argparse.Namespace) -> None:
    from moecompress.kernels import moe_experts_forward
    from moecompress.kernels.synthetic import random_expert_group, random_routing

    for model, (experts, top_k, hidden, inter) in MOE_MODELS.items():
        if model not in args.models:
            continue
        generator = torch.Generator().manual_seed(SEED)
        # bf16 experts built on the GPU (fast); the quantized ones are independent random weights of
        # the same shapes: timing does not depend on the values.
        gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
        grouped = grouped_mm_module(gate_up, down)
        for spec in args.bits:
            groups = [random_expert_group(ids, hidden, inter, b, args.group_size, generator, "cuda")
                      for b, ids in bits_plan(spec, experts)]
            expert_bytes = {}  # layer expert id -> packed bytes of its gate_up + down
            for group in groups:
                for local, expert in enumerate(group.expert_ids.tolist()):
                    gu, dn = group.gate_up, group.down
                    expert_bytes[expert] = sum(
                        packed_bytes(p.qweight[local], p.scales[local], None if p.zeros is None else p.zeros[local])
                        for p in (gu, dn)
                    )
            bf16_expert_bytes = 2 * (gate_up[0].numel() + down[0].numel())
            for routing, zipf in ROUTINGS.items():
                for batch in args.batches:
                    ids, weights = random_routing(batch, experts, top_k, generator, zipf=zipf, device="cuda")
                    weights = weights.to(torch.bfloat16)
                    x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
                    touched = torch.unique(ids).tolist()
                    act_bytes = 2 * x.numel() * 2  # read x, write out
                    quant_bytes = sum(expert_bytes[e] for e in touched) + act_bytes
                    dense_bytes = len(touched) * bf16_expert_bytes + act_bytes
                    results = {
                        "triton": (bench.time_us(lambda: moe_experts_forward(x, ids, weights, groups, experts)), quant_bytes),
                        "dequant_matmul": (bench.time_us(lambda: dequant_then_loop(x, ids, weights, groups)), quant_bytes),
                    }
                    if not args.cudagraph:  # the eager loops sync on the host: not graph-capturable
                        results["bf16"] = (bench.time_us(lambda: bf16_moe_loop(x, ids, weights, gate_up, down)), dense_bytes)
                    if grouped is not None:
                        results["grouped_mm"] = (bench.time_us(lambda: grouped(x, ids, weights)), dense_bytes)
                    base = {"kind": "moe", "shape": model, "bits": spec, "group_size": args.group_size,
                            "batch": batch, "routing": routing, "experts_touched": len(touched)}
                    bench.report(base, results)
            groups = None  # free the packed experts before the next width plan


def bench_dense(bench: Bench, args: argparse.Namespace) -> None:
    from moecompress.kernels import dequant_gemm
    from moecompress.kernels.synthetic import random_packed
    from moecompress.quant import format as fmt

    generator = torch.Generator().manual_seed(SEED)
    for k, n in DENSE_SHAPES:
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for spec in args.bits:
            bits = 4 if spec == "mixed" else int(spec)
            w = random_packed((n, k), bits, args.group_size, False, generator, "cuda")
            wbytes = packed_bytes(w.qweight, w.scales, w.zeros)
            for batch in args.batches:
                x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
                act_bytes = 2 * (x.numel() + batch * n)
                results = {
                    "triton": (bench.time_us(lambda: dequant_gemm(x, w.qweight, w.scales, w.zeros, bits, args.group_size)), wbytes + act_bytes),
                    "bf16": (bench.time_us(lambda: x @ dense.t()), dense.numel() * 2 + act_bytes),
                    "dequant_matmul": (bench.time_us(
                        lambda: x @ fmt.dequantize(w.qweight, w.scales, w.zeros, bits, args.group_size, torch.bfloat16).t()
                    ), wbytes + act_bytes),
                }
                base = {"kind": "dense", "shape": f"{k}x{n}", "bits": str(bits), "group_size": args.group_size, "batch": batch}
                bench.report(base, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_gemm.py needs a CUDA GPU and none is available; run it on a GPU machine", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernel_gemm.py needs triton; install it (pip install triton)", file=sys.stderr)
        return 2
    bench = Bench(args)
    if not args.skip_moe:
        bench_moe(bench, args)
    if not args.skip_dense:
        bench_dense(bench, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
