#!/usr/bin/env python
"""GPU microbenchmark of the RazorAttention Triton kernels (`razor_vllm.kernels.uniform_triton`).

One decode step (one query token per request) of one attention layer, paged KV cache, per context
length T and batch B:

* ``full``          the same Triton paged-attention kernel with every head a retrieval head (plain
                    full attention: the stock reference through identical code);
* ``razor``         `razor_paged_attention` with a fraction r of retrieval heads (default 0.15),
                    local heads reading sinks + window; compensation sums given (they are state in
                    the paged layout, so the step does not recompute them);
* ``razor+sums``    the uniform layout's CUDA step as `backend._forward_accelerator` runs it today:
                    `compensation_sums` (re-reads every evicted key/value of every local head, i.e.
                    the full cache) + `razor_paged_attention`;
* ``razor-ring``    the paged layout's decode step (kv_layout="paged"): the R retrieval heads'
                    full attention over their own 1-head caches (`razor_paged_attention`, all
                    retrieval) + `ring_triton.ring_decode` for the L local heads on their ring pages
                    (S + W rows, the running sums read and updated, this token written): what a
                    CUDA port of the paged layout would run per layer;
* ``sdpa``          `torch.nn.functional.scaled_dot_product_attention` on a contiguous (not
                    paged) K/V of the same size: what a dense kernel achieves on this device.

Reported per case: median time (CUDA events), KV bytes the kernel must read (the physical
minimum: full = B x T x kv_heads x 2 x D x bytes; razor = B x (R x T + L x (S + W + 1)) x 2 x D x
bytes, R/L retrieval/local KV heads), achieved bandwidth = bytes / time, and that bandwidth as a
fraction of a measured device-to-device copy (`torch.Tensor.copy_` of 1 GiB, read + write bytes).
Writes out/bench_kernels.json (+ .png).

    .venv/bin/python benchmarks/kernels.py                      # CUDA: T = 4k..128k
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/kernels.py --smoke   # CPU: tiny shapes, checks results

The smoke mode runs every case once under the Triton interpreter at tiny sizes and compares the
outputs with `torch_ops` (the CPU reference); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def make_case(batch: int, ctx: int, num_q: int, num_kv: int, d: int, block: int, ratio: float, dtype, device,
              seed: int = 0):
    """A paged cache holding `ctx` tokens for each of `batch` requests, a decode query per request,
    and a head mask with round(ratio * num_kv) retrieval heads (at least one of each kind)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_req = -(-ctx // block)
    num_blocks = batch * blocks_per_req + 1
    # one buffer, K and V interleaved like vLLM's [num_blocks, H, block, 2D] (strided halves)
    buf = torch.randn(num_blocks, num_kv, block, 2 * d, generator=gen).to(dtype).to(device)
    key_cache, value_cache = buf[..., :d], buf[..., d:]
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)
    block_table = perm[:batch * blocks_per_req].view(batch, blocks_per_req).contiguous().to(device)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_q, d, generator=gen).to(dtype).to(device)
    n_r = min(num_kv - 1, max(1, round(ratio * num_kv))) if num_kv > 1 else 0
    local = torch.ones(num_kv, dtype=torch.bool)
    local[torch.randperm(num_kv, generator=gen)[:n_r]] = False
    return dict(query=query, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
                seq_lens=seq_lens, qsl=qsl, head_is_local=local.to(device), n_r=n_r)


def kv_bytes(case_kind: str, batch: int, ctx: int, num_kv: int, n_r: int, d: int, esize: int, sinks: int,
             window: int) -> int:
    tok = 2 * d * esize
    if case_kind in ("full", "sdpa"):
        return batch * ctx * num_kv * tok
    keep = min(ctx, sinks + window + 1)
    kv = batch * (n_r * ctx + (num_kv - n_r) * keep) * tok
    if case_kind == "razor+sums":
        # compensation_sums reads [S, F) of every local head: the evicted part of the cache
        kv += batch * (num_kv - n_r) * max(0, ctx - window - sinks) * tok
    if case_kind == "razor-ring":
        # per local head: read the S + W ring rows it sees, write this token's row, read and write
        # the fp32 Ksum/Vsum rows, write the frontier (this token's K/V come with the query)
        ring = min(ctx - 1, sinks + window) * tok + tok + 4 * d * 4 + 4
        kv = batch * (n_r * ctx * tok + (num_kv - n_r) * ring)
    return kv


def make_ring_case(batch: int, ctx: int, num_q: int, num_kv: int, n_r: int, d: int, block: int, sinks: int,
                   window: int, dtype, device, seed: int = 1):
    """The paged layout's caches for one layer: a 1-head-per-retrieval-head cache of `ctx` tokens
    (as `make_case`, n_r heads, all retrieval) and one ring page per request holding the rings of
    the L = num_kv - n_r local heads (zeroed sums: a valid state), plus the decode step's plan."""
    import torch

    from razor_vllm.kernels import ring_torch as ring_ops
    from razor_vllm.kernels.ring_layout import RingLayout

    group = num_q // num_kv
    retrieval = make_case(batch, ctx, n_r * group, n_r, d, block, 0.0, dtype, device, seed) if n_r else None
    ring = RingLayout(sinks, window, d, dtype)
    n_l = num_kv - n_r
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    pages = torch.randn(batch + 1, n_l * ring.slots, 2 * d, generator=gen).to(dtype)
    for x in range(n_l):
        for r in range(1, batch + 1):
            ring_ops.ring_reset(ring.region(pages[r], x * ring.slots), ring)
    pages = pages.to(device)
    blocks = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
    plan = ring_ops.ring_decode_plan(ring, torch.full((batch,), ctx - 1), "single")
    q = torch.randn(batch, n_l, group, d, generator=gen).to(dtype).to(device)
    k = torch.randn(batch, n_l, d, generator=gen).to(dtype).to(device)
    v = torch.randn(batch, n_l, d, generator=gen).to(dtype).to(device)
    return dict(retrieval=retrieval, pages=[pages] * n_l, offsets=[x * ring.slots for x in range(n_l)],
                blocks=[blocks] * n_l, plan=plan, q=q, k=k, v=v)


def timed(fn, device: str, iters: int, warmup: int) -> float:
    """Median seconds of fn() (CUDA events on CUDA, perf_counter elsewhere)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, iters=10, warmup=3)
    return 2 * nbytes / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=parse_ints, default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--batches", type=parse_ints, default=[1, 8, 32])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.15, help="fraction of retrieval KV heads")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-cache-gib", type=float, default=40.0, help="skip cases whose KV cache is larger")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, one run per case, results checked against torch_ops (CPU + TRITON_INTERPRET=1)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_kernels.json")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run with TRITON_INTERPRET=1 --smoke (a correctness smoke test on CPU)")
    if args.smoke:
        args.contexts, args.batches = [40, 70], [1, 3]
        args.q_heads, args.kv_heads, args.head_dim, args.block_size = 4, 2, 16, 16
        args.window, args.iters, args.ratio = 8, 1, 0.5
    from razor_vllm.kernels import ring_torch as ring_ops, ring_triton, uniform_torch as torch_ops, uniform_triton as triton_ops

    dtype = getattr(torch, args.dtype)
    esize = torch.empty(0, dtype=dtype).element_size()
    d, sinks, window = args.head_dim, args.sinks, args.window
    scale = d ** -0.5
    peak = None
    if device == "cuda":
        peak = copy_bandwidth(device, 1 << 30)
        print(f"device {torch.cuda.get_device_name()}: device-to-device copy {peak / 1e9:,.0f} GB/s (read + write)")
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            cache_bytes = batch * ctx * args.kv_heads * 2 * d * esize
            if cache_bytes > args.max_cache_gib * 2**30:
                print(f"skip T={ctx} B={batch}: cache {cache_bytes / 2**30:.1f} GiB > --max-cache-gib")
                continue
            c = make_case(batch, ctx, args.q_heads, args.kv_heads, d, args.block_size, args.ratio, dtype, device)
            n_r = c["n_r"]
            all_retrieval = torch.zeros_like(c["head_is_local"])
            common = (c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"], c["qsl"])
            sums = triton_ops.compensation_sums(*common, c["head_is_local"], sinks, window)
            out = torch.empty_like(c["query"])

            def full():
                triton_ops.razor_paged_attention(c["query"], *common, scale=scale, head_is_local=all_retrieval,
                                                 sinks=sinks, window=window, out=out)

            def razor():
                triton_ops.razor_paged_attention(c["query"], *common, scale=scale, head_is_local=c["head_is_local"],
                                                 sinks=sinks, window=window, k_sum=sums[0], v_sum=sums[1],
                                                 count=sums[2], compensation="single", out=out)

            def razor_sums():
                s = triton_ops.compensation_sums(*common, c["head_is_local"], sinks, window)
                triton_ops.razor_paged_attention(c["query"], *common, scale=scale, head_is_local=c["head_is_local"],
                                                 sinks=sinks, window=window, k_sum=s[0], v_sum=s[1], count=s[2],
                                                 compensation="single", out=out)

            rc = make_ring_case(batch, ctx, args.q_heads, args.kv_heads, n_r, d, args.block_size, sinks, window,
                                dtype, device)
            ring_out = torch.empty_like(rc["q"])
            rr = rc["retrieval"]
            rr_out = torch.empty_like(rr["query"]) if rr else None
            no_local = torch.zeros_like(rr["head_is_local"]) if rr else None

            def razor_ring():
                if rr:
                    triton_ops.razor_paged_attention(
                        rr["query"], rr["key_cache"], rr["value_cache"], rr["block_table"], rr["seq_lens"],
                        rr["qsl"], scale=scale, head_is_local=no_local, sinks=sinks, window=window, out=rr_out)
                ring_triton.ring_decode(rc["pages"], rc["offsets"], rc["blocks"], rc["plan"], rc["q"], rc["k"],
                                       rc["v"], scale=scale, out=ring_out)

            # dense reference: contiguous [B, H_kv, T, D] K/V, GQA through enable_gqa
            kd = torch.randn(batch, args.kv_heads, ctx, d, device=device, dtype=dtype)
            vd = torch.randn_like(kd)
            qd = c["query"].view(batch, args.q_heads, 1, d)

            def sdpa():
                torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True)

            checks = {}
            if args.smoke:
                for name, fn, kw in (("full", full, dict(head_is_local=all_retrieval)),
                                     ("razor", razor, dict(head_is_local=c["head_is_local"], k_sum=sums[0].cpu(),
                                                           v_sum=sums[1].cpu(), count=sums[2].cpu(),
                                                           compensation="single"))):
                    fn()
                    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                    ref = torch_ops.razor_paged_attention(c["query"].cpu(), *(t.cpu() for t in common), scale=scale,
                                                          sinks=sinks, window=window, **kw)
                    err = (out.float().cpu() - ref.float()).abs().max().item()
                    checks[name] = err
                    if err > 2e-2:
                        sys.exit(f"smoke: {name} T={ctx} B={batch} differs from torch_ops by {err}")
                ref_sums = torch_ops.compensation_sums(*(t.cpu() for t in common), c["head_is_local"].cpu(), sinks,
                                                       window)
                checks["sums"] = max((a.float().cpu() - b.float()).abs().max().item() for a, b in zip(sums, ref_sums))
                ref_pages = [rc["pages"][0].cpu().clone()] * len(rc["pages"])
                ref = ring_ops.ring_decode(ref_pages, rc["offsets"], [b.cpu() for b in rc["blocks"]], rc["plan"],
                                           rc["q"].cpu(), rc["k"].cpu(), rc["v"].cpu(), scale=scale)
                razor_ring()
                checks["ring"] = max((ring_out.float().cpu() - ref.float()).abs().max().item(),
                                     0.0 if torch.equal(rc["pages"][0].cpu(), ref_pages[0]) else float("inf"))
                if checks["ring"] > 2e-2:
                    sys.exit(f"smoke: razor-ring T={ctx} B={batch} differs from ring_ops.ring_decode: {checks['ring']}")
            kinds = (("full", full), ("razor", razor), ("razor+sums", razor_sums), ("razor-ring", razor_ring),
                     ("sdpa", sdpa))
            for kind, fn in kinds:
                t = timed(fn, device, args.iters, 0 if args.smoke else 3)
                nbytes = kv_bytes(kind, batch, ctx, args.kv_heads, n_r, d, esize, sinks, window)
                row = dict(kind=kind, ctx=ctx, batch=batch, time_s=t, kv_bytes=nbytes, bandwidth=nbytes / t,
                           frac_of_copy=(nbytes / t / peak) if peak else None, retrieval_heads=n_r,
                           kv_heads=args.kv_heads)
                rows.append(row)
            case_rows = rows[-len(kinds):]
            full_t = next(r["time_s"] for r in case_rows if r["kind"] == "full")
            line = "  ".join(f"{r['kind']} {r['time_s'] * 1e3:8.3f} ms {r['bandwidth'] / 1e9:7.1f} GB/s"
                             + (f" ({100 * r['frac_of_copy']:.0f}%)" if r["frac_of_copy"] else "")
                             for r in case_rows)
            speedup = {k: full_t / next(r["time_s"] for r in case_rows if r["kind"] == k) for k in ("razor", "razor-ring")}
            print(f"T={ctx:>6} B={batch:>3}: {line}  speedup over full: razor {speedup['razor']:.2f}x, "
                  f"razor-ring {speedup['razor-ring']:.2f}x"
                  + (f"  max|err| {checks}" if checks else ""))
            c = kd = vd = qd = sums = out = rc = rr = rr_out = ring_out = None  # free this case before the next one is allocated
            if device == "cuda":
                torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
              "copy_bandwidth": peak, "smoke": args.smoke, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                                       for k, v in vars(args).items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if not args.smoke:
        plot(rows, args.out.with_suffix(".png"), peak)


def plot(rows, path: Path, peak) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for kind, style in (("full", "k-o"), ("razor", "r-s"), ("razor+sums", "r--^"), ("razor-ring", "m-d"),
                            ("sdpa", "b:.")):
            pts = sorted((r["ctx"], r["bandwidth"] / 1e9) for r in rows if r["batch"] == b and r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, label=kind)
        if peak:
            ax.axhline(peak / 1e9, color="gray", lw=0.8, ls=":", label="d2d copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {b}: achieved KV bandwidth (GB/s)", fontsize=10)
        ax.set_xlabel("context tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
