"""Per-expert vs batched expert solving on synthetic MoE layers: Hessian and GPTQ time, and agreement.

For each layer shape (experts E, hidden size H = K, tokens T, top-k) the benchmark builds skewed
routing (a Zipf-like router bias, so a few experts get most tokens and some starve), then times:

* Hessians, routed tokens only and calibrate-all (AGQ weights in both):
  ``reference``  the pass's former loop: ``expert_tokens`` (a scan of every batch per expert) + ``_hessian``;
  ``segment``    one gather per layer (``gather_routing`` + ``expert_segments``) + one GEMM per expert;
  ``padded``     the same gather + segments zero-padded to the longest and one ``bmm``
  (skipped when the padded copy would exceed --padded-max-gb);
* GPTQ on gate_up-shaped weights ``[E, N, K]`` with those Hessians: ``gptq_quantize`` per expert vs
  ``gptq_quantize_batched``; RTN per expert vs on the stack.

It prints one JSON line per shape and mode with the seconds, the speedups and whether the results agree
(Hessians and codes bit-identical for segment and batched GPTQ; padded Hessians within float32
rounding, max relative difference printed). Runs on --device (cpu default; cuda when asked).

    OMP_NUM_THREADS=1 python benchmarks/expert_solving.py --threads 1
    python benchmarks/expert_solving.py --experts 128 --hidden 1024 --tokens 32768 --top-k 8 --rows 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moecompress.passes.quantize import _ExpertInputs, _hessian, expert_tokens
from moecompress.quant.batched import expert_hessians, expert_segments, gather_routing, gptq_quantize_batched
from moecompress.quant.gptq import gptq_quantize
from moecompress.quant.grid import QuantSpec, rtn


def synthetic_store(experts: int, hidden: int, tokens: int, top_k: int, batches: int, seed: int, device) -> _ExpertInputs:
    """Calibration batches as the quantize pass records them, with skewed routing."""
    gen = torch.Generator().manual_seed(seed)
    store = _ExpertInputs()
    bias = -1.5 * torch.log(torch.arange(1, experts + 1, dtype=torch.float32))  # Zipf-like popularity
    per = tokens // batches
    for _ in range(batches):
        x = torch.randn(per, 16, generator=gen) @ torch.randn(16, hidden, generator=gen) + 0.1 * torch.randn(per, hidden, generator=gen)
        probs = (torch.randn(per, experts, generator=gen) + bias).softmax(-1)
        w, idx = probs.topk(top_k, dim=-1)
        store.x.append(x.to(device))
        store.index.append(idx.to(device))
        store.weights.append((w / w.sum(-1, keepdim=True)).to(device))
        store.probs.append(probs.to(device))
    return store


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def bench_hessians(store, experts: int, hidden: int, all_tokens: bool, padded_max_gb: float, device):
    def reference():
        return torch.stack([_hessian(*expert_tokens(store, e, all_tokens, True)[:2], hidden) for e in range(experts)])

    def segment():
        routing = gather_routing(store.x, store.index, store.weights, store.probs, experts)
        return expert_hessians(expert_segments(routing, range(experts), all_tokens, True), hidden, "segment")

    def padded():
        routing = gather_routing(store.x, store.index, store.weights, store.probs, experts)
        return expert_hessians(expert_segments(routing, range(experts), all_tokens, True), hidden, "padded")

    ref, t_ref = timed(reference, device)
    seg, t_seg = timed(segment, device)
    row = {"hessian_reference_s": round(t_ref, 4), "hessian_segment_s": round(t_seg, 4), "hessian_segment_equal": bool(torch.equal(seg, ref))}
    routing = gather_routing(store.x, store.index, store.weights, store.probs, experts)
    t_max = routing.num_tokens if all_tokens else max(routing.routed_counts())
    if experts * t_max * hidden * 4 / 2**30 <= padded_max_gb:
        pad, t_pad = timed(padded, device)
        scale = ref.abs().amax(dim=(1, 2)).clamp_min(1e-30).view(-1, 1, 1)
        row.update(hessian_padded_s=round(t_pad, 4), hessian_padded_max_rel_diff=float(((pad - ref).abs() / scale).max()))
    else:
        row.update(hessian_padded_s=None, hessian_padded_skipped=f"padded copy over {padded_max_gb} GB")
    counts = routing.routed_counts()
    row.update(routed_min=min(counts), routed_max=max(counts))
    return ref, row


def bench_solve(h: torch.Tensor, rows: int, bits: int, group: int, seed: int, device):
    experts, hidden = h.shape[0], h.shape[-1]
    gen = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(experts, rows, hidden, generator=gen) * 0.05).to(device)
    spec = QuantSpec(bits, group)
    per, t_per = timed(lambda: [gptq_quantize(w[e], h[e], spec)[0] for e in range(experts)], device)
    stacked, t_bat = timed(lambda: gptq_quantize_batched(w, h, spec)[0], device)
    rtn_per, t_rtn_per = timed(lambda: [rtn(w[e], spec) for e in range(experts)], device)
    rtn_bat, t_rtn_bat = timed(lambda: rtn(w, spec), device)
    return {
        "solve_reference_s": round(t_per, 4),
        "solve_batched_s": round(t_bat, 4),
        "solve_speedup": round(t_per / t_bat, 2),
        "codes_equal": all(torch.equal(stacked.codes[e], per[e].codes) and torch.equal(stacked.scales[e], per[e].scales) for e in range(experts)),
        "rtn_reference_s": round(t_rtn_per, 4),
        "rtn_batched_s": round(t_rtn_bat, 4),
        "rtn_codes_equal": all(torch.equal(rtn_bat.codes[e], rtn_per[e].codes) for e in range(experts)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--hidden", type=int, default=256, help="H = K of the Hessians")
    ap.add_argument("--rows", type=int, default=256, help="N of the solved weights (2I for gate_up)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8, help="calibration batches the tokens arrive in")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["routed", "all"], choices=["routed", "all"])
    ap.add_argument("--no-solve", action="store_true", help="Hessians only")
    ap.add_argument("--padded-max-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    for experts in a.experts:
        store = synthetic_store(experts, a.hidden, a.tokens, a.top_k, a.batches, a.seed, device)
        for mode in a.modes:
            h, row = bench_hessians(store, experts, a.hidden, mode == "all", a.padded_max_gb, device)
            out = {"experts": experts, "hidden": a.hidden, "tokens": a.tokens, "top_k": a.top_k, "mode": mode,
                   "threads": torch.get_num_threads(), "device": str(device), **row}
            out["hessian_segment_speedup"] = round(row["hessian_reference_s"] / max(row["hessian_segment_s"], 1e-9), 2)
            if not a.no_solve and mode == a.modes[0]:  # the solve does not depend on the token mode
                out.update(rows=a.rows, bits=a.bits, group_size=a.group_size, **bench_solve(h, a.rows, a.bits, a.group_size, a.seed, device))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
