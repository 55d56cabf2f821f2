#!/usr/bin/env python3
"""FULL CUDA-graph capture and replay of one paged-layout attention layer's decode step, as razor's
`PagedTriton.forward` (razor_vllm/vllm/forward_paged_triton.py) runs it on the triton path.

The layer: G = 4 query heads per KV head, D = 128, bf16, 8 KV heads: 3 retrieval heads (each a
1-head sibling cache ``[num_blocks, 1, P, 2D]``, all three written by one
`sibling_triton.write_siblings` launch and each attended with `uniform_triton.razor_paged_attention`, head_is_local = [False]) and 5 local heads
(ring regions S = 4, W = 64: three in page tensor A, two in page tensor B, each page tensor with its
own block table; one `ring_decode_rows` launch over the whole padded batch). P = page tokens =
round_up(3 * ring.slots, 16), the retrieval siblings' block size too.

The batch: 8 rows in persistent runner-like buffers (query_start_loc int32 [9], seq_lens int32 [8],
int32 block tables, int64 slot mapping, q/k/v views of one fused qkv buffer, out): 5 live decode rows
(q_len 1) and 3 CUDA-graph padding rows (q_len 0, seq_len 0, block-table rows 0 = the null block,
slot -1). The step is warmed up eagerly on a side stream (its writes are then undone), captured in a
`torch.cuda.CUDAGraph`, and replayed for --steps steps, every live request advancing one token per
step (seq_lens, slot mapping, q/k/v updated in place). After each replay:

(a) the same step run eagerly on a clone of all state: outputs within bf16 tolerance (and whether
    bit-equal), ring pages and sibling caches bit-equal;
(b) CPU references: `ring_torch.ring_step` on CPU copies of the ring regions (the whole pages bit
    for bit: K/V slots + frontier, and the decode-folded fp32 sums) and, for the retrieval heads, a
    dense fp32 softmax over the K/V history the script kept itself (the sibling caches bit-equal to a
    CPU copy written at the slot mapping);
(c) the null block 0 of every page tensor and sibling cache untouched, the padding rows' out rows
    still the sentinel, every live row written.

Then replay vs eager time per step (CUDA events over --iters iterations). Prints a table, writes JSON
(--out, default $OUT/graph_check.json with OUT defaulting to out/gpu) and exits 0 when everything
held, 1 on any failure, 2 without CUDA, 3 when an import is missing.

``--cpu-interpret`` runs everything but the capture on CPU tensors under TRITON_INTERPRET=1 (the
"replay" is then the eager step on the live state), to check the script's logic and references
without a GPU.

Needs torch + triton + this repository; no vLLM. `razor_vllm.kernels.ring_torch` / `uniform_triton`
import `razor_vllm.config`, which imports pydantic: on the GPU machine it comes from the wheels that
scripts/gpu_check.sh unpacks from .whl/ (`make gpu-wheels`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

G, D, KV_HEADS = 4, 128, 8
SINKS, WINDOW = 4, 64
RETRIEVAL = (1, 4, 6)                    # KV heads with a 1-head sibling cache
LOCAL_A = (2, 0, 5)                      # KV heads of the regions 0, 1, 2 of page tensor A
LOCAL_B = (7, 3)                         # KV heads of the regions 0, 1 of page tensor B
ROWS = 8                                 # batch rows = padded tokens (a FULL decode graph's size)
STARTS = (1, 5, SINKS + WINDOW - 1, SINKS + WINDOW + 7, 300)   # the live rows' cached tokens at step 0
SENTINEL = 123.0                         # exact in bf16: out rows no kernel may write
REL_TOL = 2e-2                           # bf16 outputs: max |err| <= REL_TOL * max |ref| (as the kernel tests)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result (default $OUT/graph_check.json, OUT=out/gpu)")
    ap.add_argument("--cpu-interpret", action="store_true",
                    help="CPU tensors under TRITON_INTERPRET=1, no capture (checks the script's references)")
    ap.add_argument("--steps", type=int, default=3, help="replayed (and verified) decode steps")
    ap.add_argument("--iters", type=int, default=50, help="replays / eager steps timed")
    ap.add_argument("--compensation", default="single", choices=("none", "single", "count"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bits(t):
    import torch
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


class State:
    """Every tensor of one layer step. `base` holds the allocations; the kernel arguments are views
    of them (query/key/value of the fused qkv buffer, block table B a strided column slice) and the
    descriptor table of the local heads, built from this state's own pages and block tables."""

    MUTABLE = ("page_a", "page_b", "sib0", "sib1", "sib2", "out")

    def __init__(self, base: dict, ring):
        import torch

        from razor_vllm.kernels import ring_triton

        self.base, self.ring = base, ring
        hq = KV_HEADS * G
        qkv = base["qkv"]
        self.query, self.key, self.value = qkv[:, :hq], qkv[:, hq:hq + KV_HEADS], qkv[:, hq + KV_HEADS:]
        self.out, self.qsl, self.seq_lens = base["out"], base["qsl"], base["seq_lens"]
        self.bt_sib, self.slot = base["bt_sib"], base["slot"]
        self.bt_a, self.bt_b = base["bt_a"], base["bt_b_wide"][:, 2:5]
        self.sibs = [base[f"sib{i}"] for i in range(len(RETRIEVAL))]
        self.no_local = base["no_local"]
        # (kv head, page tensor [num_blocks, P, 2D] = cache[:, 0] as PagedTriton takes it, offset, block table)
        self.local = ([(h, base["page_a"][:, 0], i * ring.slots, self.bt_a) for i, h in enumerate(LOCAL_A)]
                      + [(h, base["page_b"][:, 0], i * ring.slots, self.bt_b) for i, h in enumerate(LOCAL_B)])
        self.table = ring_triton.ring_table([ring_triton.RingHead(*x) for x in self.local],
                                            qkv.device, ring=ring)
        assert self.table.dtype == torch.int64
        from razor_vllm.kernels import sibling_triton

        self.sib_table = sibling_triton.sibling_table(
            [sibling_triton.SiblingHead(h, self.sibs[i], self.slot) for i, h in enumerate(RETRIEVAL)], qkv.device)

    def clone(self) -> "State":
        return State({k: v.clone() for k, v in self.base.items()}, self.ring)

    def snapshot(self) -> dict:
        return {k: self.base[k].clone() for k in self.MUTABLE}

    def restore(self, snap: dict) -> None:
        for k, v in snap.items():
            self.base[k].copy_(v)  # in place: the graph and the table keep their addresses


def layer_step(st: State, *, scale: float, compensation: str) -> None:
    """`PagedTriton.forward` of a decode-only padded step (md.num_decodes = all rows, no chunks):
    one sibling write for every retrieval head, each head's attention on strided views of
    query/out, then one `ring_decode_rows` launch for every local head."""
    from razor_vllm.kernels import ring_triton, sibling_triton, uniform_triton

    n = ROWS
    sibling_triton.write_siblings(st.sib_table, st.key, st.value, n)
    for i, h in enumerate(RETRIEVAL):
        cache = st.sibs[i]
        key_cache, value_cache = cache[..., :D], cache[..., D:]
        uniform_triton.razor_paged_attention(
            st.query[:n, h * G:(h + 1) * G], key_cache, value_cache, st.bt_sib, st.seq_lens, st.qsl,
            scale=scale, head_is_local=st.no_local, sinks=0, window=1, out=st.out[:n, h * G:(h + 1) * G])
    ring_triton.ring_decode_rows(st.table, st.ring, st.qsl, st.seq_lens, ROWS, st.query, st.key, st.value, st.out,
                                 scale=scale, compensation=compensation)


class Setup:
    """The initial state on CPU (dirty pages, realistic ring states, sibling histories) and the CPU
    references that follow it step by step."""

    def __init__(self, args, ring, dtype):
        import torch

        from razor_vllm.kernels import ring_torch

        self.args, self.ring, self.dtype = args, ring, dtype
        self.gen = gen = torch.Generator().manual_seed(args.seed)
        self.scale = D ** -0.5
        self.P = P = round_up(len(LOCAL_A) * ring.slots, 16)
        nlive = len(STARTS)
        max_len = max(STARTS) + args.steps + 1
        self.sib_cols = max_blocks = -(-max_len // P) + 1
        nb_sib = 1 + nlive * max_blocks + 2
        nb_ring = 1 + nlive + 2

        def dirty(*shape):
            return (torch.randn(*shape, generator=gen) * 5).to(dtype)

        base = {
            "qkv": dirty(ROWS, KV_HEADS * G + 2 * KV_HEADS, D),
            "out": torch.full((ROWS, KV_HEADS * G, D), SENTINEL, dtype=dtype),
            "qsl": torch.zeros(ROWS + 1, dtype=torch.int32),
            "seq_lens": torch.zeros(ROWS, dtype=torch.int32),
            "bt_sib": torch.zeros(ROWS, max_blocks, dtype=torch.int32),
            "slot": torch.full((ROWS,), -1, dtype=torch.int64),
            "bt_a": torch.zeros(ROWS, 4, dtype=torch.int32),
            "bt_b_wide": torch.zeros(ROWS, 7, dtype=torch.int32),
            "page_a": dirty(nb_ring, 1, P, 2 * D),
            "page_b": dirty(nb_ring, 1, P, 2 * D),
            "no_local": torch.zeros(1, dtype=torch.bool),
        }
        for i in range(len(RETRIEVAL)):
            base[f"sib{i}"] = dirty(nb_sib, 1, P, 2 * D)
        # block tables: live rows get distinct non-null blocks; padding rows stay all 0 (null block)
        sib_blocks = (torch.randperm(nb_sib - 1, generator=gen) + 1)[:nlive * max_blocks].view(nlive, max_blocks)
        base["bt_sib"][:nlive] = sib_blocks.to(torch.int32)
        base["bt_a"][:nlive, 0] = (torch.randperm(nb_ring - 1, generator=gen)[:nlive] + 1).to(torch.int32)
        base["bt_b_wide"][:nlive, 2] = (torch.randperm(nb_ring - 1, generator=gen)[:nlive] + 1).to(torch.int32)
        base["bt_a"][:nlive, 1:] = 77        # other columns of a ring block table: never read
        base["bt_b_wide"][:nlive, 3:5] = 77
        base["bt_b_wide"][:, [0, 1, 5, 6]] = 99  # outside the slice
        self.base = base
        self.nlive = nlive

        # prior ring states: ring_step over random earlier chunks
        cpu_state = State(base, ring)
        for r, start in enumerate(STARTS):
            for _, page, off, bt in cpu_state.local:
                region = ring.region(page[int(bt[r, 0])], off)
                pos = 0
                while pos < start:
                    c = min(start - pos, int(torch.randint(1, 2 * WINDOW + 3, (1,), generator=gen)))
                    ring_torch.ring_step(region, ring, torch.randn(c, G, D, generator=gen).to(dtype),
                                         torch.randn(c, D, generator=gen).to(dtype),
                                         torch.randn(c, D, generator=gen).to(dtype), pos,
                                         scale=self.scale, compensation=args.compensation)
                    pos += c
        # sibling histories: positions [0, start) of every (live row, retrieval head), in the caches
        self.hist = {}
        for r, start in enumerate(STARTS):
            for i in range(len(RETRIEVAL)):
                k = torch.randn(start, D, generator=gen).to(dtype)
                v = torch.randn(start, D, generator=gen).to(dtype)
                self.hist[r, i] = [k, v]
                for p in range(start):
                    blk = int(base["bt_sib"][r, p // P])
                    base[f"sib{i}"][blk, 0, p % P] = torch.cat([k[p], v[p]])
        # the CPU references: copies of the ring pages and the sibling caches, stepped by ring_step /
        # the slot mapping
        self.ref = State({k: v.clone() for k, v in base.items()}, ring)
        self.null0 = {k: bits(base[k][0]).clone() for k in ("page_a", "page_b", "sib0", "sib1", "sib2")}

    def step_inputs(self, step: int):
        """(qkv, qsl, seq_lens, slot) of decode step `step` (every live row one token further)."""
        import torch

        gen, P = self.gen, self.P
        qkv = torch.randn(ROWS, KV_HEADS * G + 2 * KV_HEADS, D, generator=gen).to(self.dtype)
        q_lens = [1] * self.nlive + [0] * (ROWS - self.nlive)
        qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        starts = [s + step for s in STARTS]
        # tokens cached after the step (this one included); the new token's position is `start`
        seq_lens = torch.tensor([s + 1 for s in starts] + [0] * (ROWS - self.nlive), dtype=torch.int32)
        slot = torch.full((ROWS,), -1, dtype=torch.int64)
        for r, pos in enumerate(starts):
            slot[r] = int(self.base["bt_sib"][r, pos // P]) * P + pos % P
        return qkv, qsl, seq_lens, slot, starts

    def reference_step(self, inputs):
        """The CPU references of one step; returns the expected out (sentinel where nothing writes),
        advancing the reference pages, sibling caches and histories."""
        import torch

        from razor_vllm.kernels import ring_torch

        qkv, qsl, seq_lens, slot, starts = inputs
        ref, ring = self.ref, self.ring
        ref.base["qkv"].copy_(qkv)
        out = torch.full((ROWS, KV_HEADS * G, D), SENTINEL, dtype=self.dtype)
        for r, start in enumerate(starts):
            t = int(qsl[r])
            for kvh, page, off, bt in ref.local:
                region = ring.region(page[int(bt[r, 0])], off)
                hs = slice(kvh * G, (kvh + 1) * G)
                out[t:t + 1, hs] = ring_torch.ring_step(
                    region, ring, ref.query[t:t + 1, hs], ref.key[t:t + 1, kvh], ref.value[t:t + 1, kvh], start,
                    scale=self.scale, compensation=self.args.compensation)
            for i, h in enumerate(RETRIEVAL):
                k_new, v_new = ref.key[t, h], ref.value[t, h]
                s = int(slot[t])
                ref.sibs[i][s // self.P, 0, s % self.P] = torch.cat([k_new, v_new])
                hist = self.hist[r, i]
                hist[0] = torch.cat([hist[0], k_new[None]])
                hist[1] = torch.cat([hist[1], v_new[None]])
                k, v = hist[0].float(), hist[1].float()
                assert k.shape[0] == start + 1 == int(seq_lens[r])
                logits = ref.query[t, h * G:(h + 1) * G].float() @ k.T * self.scale
                out[t, h * G:(h + 1) * G] = (torch.softmax(logits, dim=-1) @ v).to(self.dtype)
        return out

    def sum_rows(self):
        """bool [P]: the Ksum/Vsum slots of every region of a page (same offsets in A and B)."""
        import torch

        mask = torch.zeros(self.P, dtype=torch.bool)
        for i in range(len(LOCAL_A)):
            off = i * self.ring.slots
            mask[off + self.ring.ksum_offset:off + self.ring.meta_offset] = True
        return mask


def rel_err(got, want, mask):
    """(max |got - want| over mask, that / max |want| over mask)."""
    g, w = got.float()[mask], want.float()[mask]
    if g.numel() == 0:
        return 0.0, 0.0
    err = float((g - w).abs().max())
    return err, err / max(float(w.abs().max()), 1e-30)


def main(argv=None) -> int:
    args = parse_args(argv)
    # chosen when @triton.jit runs: before anything imports Triton (torch may, lazily)
    os.environ["TRITON_INTERPRET"] = "1" if args.cpu_interpret else "0"
    out_dir = pathlib.Path(os.environ.get("OUT", "out/gpu"))
    out_path = pathlib.Path(args.out) if args.out else out_dir / "graph_check.json"
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_interpret and not torch.cuda.is_available():
        print("gpu_graph_check: no CUDA device (torch.cuda.is_available() is False): the CUDA-graph check "
              "needs one; --cpu-interpret runs the eager part on CPU under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    try:
        import triton

        from razor_vllm.kernels import ring_triton, ring_torch, uniform_triton  # noqa: F401
        from razor_vllm.kernels.ring_layout import RingLayout
    except ImportError as e:
        print(f"gpu_graph_check: import failed: {e!r} (razor_vllm.config needs pydantic: on the GPU machine, "
              f"carry the wheels of `make gpu-wheels` in .whl/ and run through scripts/gpu_check.sh)", file=sys.stderr)
        return 3

    device = torch.device("cpu") if args.cpu_interpret else torch.device("cuda")
    graph_mode = not args.cpu_interpret
    dtype = torch.bfloat16
    ring = RingLayout(SINKS, WINDOW, D, dtype)
    if args.cpu_interpret:
        torch.set_num_threads(1)
    setup = Setup(args, ring, dtype)
    live = State({k: v.to(device, copy=True) for k, v in setup.base.items()}, ring)
    scale, comp = setup.scale, args.compensation

    def run_step(st):
        layer_step(st, scale=scale, compensation=comp)

    def sync():
        if graph_mode:
            torch.cuda.synchronize()

    result = {
        "ok": False, "mode": "cuda-graph" if graph_mode else "cpu-interpret",
        "device": torch.cuda.get_device_name() if graph_mode else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__, "triton": triton.__version__,
        "geometry": {"G": G, "D": D, "kv_heads": KV_HEADS, "retrieval_kv_heads": RETRIEVAL,
                     "local_kv_heads_page_a": LOCAL_A, "local_kv_heads_page_b": LOCAL_B, "sinks": SINKS,
                     "window": WINDOW, "ring_slots": ring.slots, "page_tokens": setup.P, "rows": ROWS,
                     "live_starts_step0": STARTS, "dtype": str(dtype), "compensation": comp},
        "steps": [], "failures": [],
    }
    failures = result["failures"]

    # warm-up (compiles every kernel), undone; then the capture, which must launch nothing
    graph = None
    snap = live.snapshot()
    warm_inputs = setup.step_inputs(0)
    live.base["qkv"].copy_(warm_inputs[0]), live.qsl.copy_(warm_inputs[1])
    live.seq_lens.copy_(warm_inputs[2]), live.slot.copy_(warm_inputs[3])
    if graph_mode:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run_step(live)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        live.restore(snap)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_step(live)
        torch.cuda.synchronize()
        after = live.snapshot()
        captured_nothing = all(torch.equal(bits(after[k]), bits(snap[k])) for k in snap)
        result["capture_launched_nothing"] = captured_nothing
        if not captured_nothing:
            failures.append("capture: the captured step wrote state (it ran instead of being recorded)")
            live.restore(snap)
    else:
        live.restore(snap)
    del snap
    # the verified steps' inputs: the same draws in both modes
    setup.gen.manual_seed(args.seed + 1)

    sum_rows = setup.sum_rows()
    header = (f"{'step':>4} {'starts':>22} {'out g-e':>8} {'g=e bits':>8} {'state g=e':>9} {'ring err':>9} "
              f"{'ring kv/F':>9} {'sums':>5} {'retr err':>9} {'sib':>4} {'null0':>5} {'pad':>4} {'ok':>3} "
              f"{'replay us':>10} {'eager us':>10}")
    print(header)
    for step in range(args.steps):
        inputs = setup.step_inputs(step)
        qkv, qsl, seq_lens, slot, starts = inputs
        # the runner's in-place updates of the persistent buffers (outside the graph)
        live.base["qkv"].copy_(qkv)
        live.qsl.copy_(qsl)
        live.seq_lens.copy_(seq_lens)
        live.slot.copy_(slot)
        live.out.fill_(SENTINEL)
        eager = live.clone()
        sync()
        if graph_mode:  # this step's replay and eager times (one shot each; the averages come below)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            graph.replay()
            ev[1].record()
            run_step(eager)
            ev[2].record()
            torch.cuda.synchronize()
            step_us = (ev[0].elapsed_time(ev[1]) * 1e3, ev[1].elapsed_time(ev[2]) * 1e3)
        else:
            t0 = time.perf_counter()
            run_step(live)
            t1 = time.perf_counter()
            run_step(eager)
            step_us = ((t1 - t0) * 1e6, (time.perf_counter() - t1) * 1e6)
        want = setup.reference_step(inputs)
        got = live.out.cpu()
        got_e = eager.out.cpu()

        row = {"step": step, "starts": starts, "replay_us": step_us[0] if graph_mode else None,
               "eager_us": step_us[1]}
        toks = torch.zeros(ROWS, dtype=torch.bool)
        toks[:setup.nlive] = True
        live_mask = toks[:, None, None].expand_as(got)
        # (a) graph vs eager
        row["out_err_graph_vs_eager"], rel_ge = rel_err(got, got_e, live_mask)
        row["out_bit_equal_graph_vs_eager"] = bool(torch.equal(bits(got), bits(got_e)))
        state_eq = {k: bool(torch.equal(bits(live.base[k]), bits(eager.base[k])))
                    for k in ("page_a", "page_b", "sib0", "sib1", "sib2")}
        row["state_bit_equal_graph_vs_eager"] = all(state_eq.values())
        # (b) CPU references
        heads_local = torch.zeros(KV_HEADS * G, dtype=torch.bool)
        for h in LOCAL_A + LOCAL_B:
            heads_local[h * G:(h + 1) * G] = True
        m_loc = live_mask & heads_local[None, :, None]
        m_ret = live_mask & ~heads_local[None, :, None]
        row["ring_out_err_vs_ring_step"], rel_loc = rel_err(got, want, m_loc)
        row["retrieval_out_err_vs_dense"], rel_ret = rel_err(got, want, m_ret)
        row["rel_err"] = {"graph_vs_eager": rel_ge, "ring_vs_ring_step": rel_loc, "retrieval_vs_dense": rel_ret,
                          "bound": REL_TOL}
        kv_eq = sums_eq = True
        for k in ("page_a", "page_b"):
            page, refp = bits(live.base[k].cpu()[:, 0]), bits(setup.ref.base[k][:, 0])
            kv_eq &= bool(torch.equal(page[:, ~sum_rows], refp[:, ~sum_rows]))
            sums_eq &= bool(torch.equal(page[:, sum_rows], refp[:, sum_rows]))
        row["ring_kv_frontier_bit_equal"], row["ring_sums_bit_equal"] = kv_eq, sums_eq
        row["sibling_caches_bit_equal"] = all(
            torch.equal(bits(live.base[f"sib{i}"].cpu()), bits(setup.ref.base[f"sib{i}"])) for i in range(3))
        # (c) null blocks, padding rows, live rows
        row["null_blocks_untouched"] = all(torch.equal(bits(live.base[k][0].cpu()), v)
                                           for k, v in setup.null0.items())
        row["padding_rows_untouched"] = bool((got[~toks] == SENTINEL).all() and (got_e[~toks] == SENTINEL).all())
        row["live_rows_written"] = bool((got[toks] != SENTINEL).all())
        checks = {
            "graph==eager out within bf16 tolerance": rel_ge <= REL_TOL,
            "graph==eager state bit-equal": row["state_bit_equal_graph_vs_eager"],
            "ring out vs ring_step": rel_loc <= REL_TOL,
            "retrieval out vs dense": rel_ret <= REL_TOL,
            "ring K/V slots + frontier bit-equal": kv_eq,
            "ring sums bit-equal": sums_eq,
            "sibling caches bit-equal": row["sibling_caches_bit_equal"],
            "null blocks untouched": row["null_blocks_untouched"],
            "padding rows untouched": row["padding_rows_untouched"],
            "live rows written": row["live_rows_written"],
        }
        row["ok"] = all(checks.values())
        failures.extend(f"step {step}: {name}" for name, good in checks.items() if not good)
        result["steps"].append(row)
        print(f"{step:>4} {str(starts):>22} {row['out_err_graph_vs_eager']:>8.2e} "
              f"{str(row['out_bit_equal_graph_vs_eager']):>8} {str(row['state_bit_equal_graph_vs_eager']):>9} "
              f"{row['ring_out_err_vs_ring_step']:>9.2e} {str(kv_eq):>9} {str(sums_eq):>5} "
              f"{row['retrieval_out_err_vs_dense']:>9.2e} {str(row['sibling_caches_bit_equal']):>4} "
              f"{str(row['null_blocks_untouched']):>5} {str(row['padding_rows_untouched']):>4} "
              f"{'yes' if row['ok'] else 'NO':>3} "
              f"{(f'{step_us[0]:.1f}' if graph_mode else '-'):>10} {step_us[1]:>10.1f}")
        del eager

    # timing (after the verified steps: the state is no longer checked)
    timing = {"iters": args.iters}
    if graph_mode:
        def per_step_us(fn, iters):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(iters):
                fn()
            t1.record()
            torch.cuda.synchronize()
            return t0.elapsed_time(t1) * 1e3 / iters

        timing["replay_us"] = per_step_us(graph.replay, args.iters)
        timing["eager_us"] = per_step_us(lambda: run_step(live), args.iters)
        timing["speedup"] = timing["eager_us"] / timing["replay_us"] if timing["replay_us"] > 0 else None
        print(f"per step, mean of {args.iters}: replay {timing['replay_us']:.1f} us, eager {timing['eager_us']:.1f} us"
              + (f" ({timing['speedup']:.1f}x)" if timing["speedup"] else ""))
    else:
        t = time.perf_counter()
        run_step(live)
        timing["replay_us"] = None
        timing["eager_us_interpreted"] = (time.perf_counter() - t) * 1e6
        print(f"one interpreted eager step: {timing['eager_us_interpreted'] / 1e3:.0f} ms (no capture, no replay)")
    result["timing"] = timing
    result["ok"] = not failures and len(result["steps"]) == args.steps
    for f in failures:
        print("FAIL:", f)
    print("graph check:", "OK" if result["ok"] else "FAILED", f"({result['mode']})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
