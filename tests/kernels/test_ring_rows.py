"""The capture-safe ring kernels of `ring_triton` (`ring_table`, `ring_decode_rows`, `ring_chunks` =
`ring_chunk_attend` + `ring_chunk_fold_write`) under the Triton interpreter, against the oracle
`ring_torch.ring_step` per (request, local head).

A batch is built the way vLLM hands it to an attention layer: flattened query/key/value rows,
query_start_loc / seq_lens, int32 block tables. The layer has 4 KV heads, 3 of them local: two in
page tensor A (offsets 0 and ring.slots, block table A) and one in page tensor B (its own block
table, a strided column slice of a wider tensor); KV head 1 is a retrieval head the kernels must not
touch. Pages start dirty (vLLM does not zero them) and each live region holds a realistic state
replayed with `ring_step` over random earlier chunks. Every page's null block 0 must stay untouched.

Two modes: under the interpreter (``TRITON_INTERPRET=1``, the default here) the kernels run on the CPU
tensors themselves; with ``TRITON_INTERPRET=0`` and CUDA (scripts/gpu_check.sh) they run compiled on
device copies of the same inputs (the descriptor table built from the device tensors), and the
results are copied back and compared with the same oracle and the same bounds. Otherwise: skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from razor_vllm.kernels import ring_torch as ring_ops
from razor_vllm.kernels.ring_layout import RingLayout

pytest.importorskip("triton", reason="triton is not installed")
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"  # the interpreter on the CPU tensors
elif torch.cuda.is_available():
    DEVICE = "cuda"  # compiled, on device copies of the CPU-built inputs
else:
    pytest.skip("TRITON_INTERPRET is not 1 (compiled Triton) and there is no CUDA device: these tests run "
                "the kernels interpreted on CPU (TRITON_INTERPRET=1) or compiled on CUDA", allow_module_level=True)

from razor_vllm.kernels import ring_triton  # noqa: E402

D, G, KV_HEADS = 16, 2, 4
SENTINEL = 123.0  # out rows no kernel may write


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _dev(t: torch.Tensor) -> torch.Tensor:
    """A device copy of a CPU-built tensor (the tensor itself under the interpreter); keeps strides."""
    if DEVICE == "cpu":
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)


def _full(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=dtype, device=DEVICE)


class Batch:
    """Pages, block tables, table and step tensors of one batch. `reqs`: (start, q_len, live) per
    request; a request that is not live has ring block 0 in every block table.

    The attributes without prefix are the CPU tensors (the oracle's inputs); ``d_*`` are what the
    kernels get: the same tensors under the interpreter, device copies on CUDA (``table`` is built
    from the device pages and block tables)."""

    def __init__(self, ring: RingLayout, reqs, *, seed: int, pad_rows: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ring, self.reqs = ring, reqs
        dtype, nreq = ring.dtype, len(reqs)
        num_blocks = nreq + 3
        self.page_a = (torch.randn(num_blocks, 2 * ring.slots + 2, 2 * D, generator=gen) * 7).to(dtype)
        self.page_b = (torch.randn(num_blocks, ring.slots + 3, 2 * D, generator=gen) * 7).to(dtype)
        max_reqs = nreq + pad_rows + 2
        self.bt_a = torch.zeros(max_reqs, 3, dtype=torch.int32)
        wide = torch.zeros(max_reqs, 7, dtype=torch.int32)
        self.bt_b = wide[:, 2:5]  # row stride 7, column stride 1
        blocks_a = torch.randperm(num_blocks - 1, generator=gen)[:nreq] + 1
        blocks_b = torch.randperm(num_blocks - 1, generator=gen)[:nreq] + 1
        for r, (_, _, live) in enumerate(reqs):
            if live:
                self.bt_a[r, 0], self.bt_b[r, 0] = int(blocks_a[r]), int(blocks_b[r])
            self.bt_a[r, 1] = self.bt_b[r, 1] = 77  # other columns: never read
        # padding rows' block table rows name a real block: q_len 0 must keep the kernels off it
        self.bt_a[nreq:, 0], self.bt_b[nreq:, 0] = int(blocks_a[0]), int(blocks_b[0])
        # (kv_head, page, offset, block table) of the local heads
        self.heads = [(2, self.page_a, 0, self.bt_a), (0, self.page_a, ring.slots, self.bt_a),
                      (3, self.page_b, 1, self.bt_b)]

        # the step: flattened rows
        q_lens = [c for _, c, _ in reqs] + [0] * pad_rows
        self.qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        self.seq_lens = torch.tensor([s + c for s, c, _ in reqs] + [0] * pad_rows, dtype=torch.int32)
        t = int(self.qsl[-1])
        self.query = torch.randn(t, KV_HEADS * G, D, generator=gen).to(dtype)
        self.key = torch.randn(t, KV_HEADS, D, generator=gen).to(dtype)
        self.value = torch.randn(t, KV_HEADS, D, generator=gen).to(dtype)

        # prior state of the live regions: ring_step over random earlier chunks
        for r, (start, _, live) in enumerate(reqs):
            if not live or start == 0:
                continue
            for kvh, page, off, bt in self.heads:
                region = ring.region(page[int(bt[r, 0])], off)
                pos = 0
                while pos < start:
                    c = min(start - pos, int(torch.randint(1, 2 * ring.window + 3, (1,), generator=gen)))
                    k = torch.randn(c, D, generator=gen).to(dtype)
                    v = torch.randn(c, D, generator=gen).to(dtype)
                    q = torch.randn(c, G, D, generator=gen).to(dtype)
                    ring_ops.ring_step(region, ring, q, k, v, pos, scale=D ** -0.5, compensation="count")
                    pos += c

        # what the kernels get (built after the prior state: device copies hold it)
        self.d_page_a, self.d_page_b = _dev(self.page_a), _dev(self.page_b)
        self.d_bt_a = _dev(self.bt_a)
        self.d_bt_b = _dev(wide)[:, 2:5]  # the same strided column slice on the device
        d_pages = {id(self.page_a): self.d_page_a, id(self.page_b): self.d_page_b}
        d_bts = {id(self.bt_a): self.d_bt_a, id(self.bt_b): self.d_bt_b}
        self.d_heads = [(kvh, d_pages[id(page)], off, d_bts[id(bt)]) for kvh, page, off, bt in self.heads]
        self.table = ring_triton.ring_table([ring_triton.RingHead(*h) for h in self.d_heads], DEVICE, ring=ring)
        self.d_qsl, self.d_seq_lens = _dev(self.qsl), _dev(self.seq_lens)
        self.d_query, self.d_key, self.d_value = _dev(self.query), _dev(self.key), _dev(self.value)

    def run_args(self):
        """(table, ring, query_start_loc, seq_lens) for a launch."""
        return self.table, self.ring, self.d_qsl, self.d_seq_lens

    def qkv(self):
        return self.d_query, self.d_key, self.d_value

    def oracle(self, rows, *, scale, compensation):
        """ring_step on cloned pages for the requests `rows`; returns (pages A, B, out)."""
        ring = self.ring
        page_a, page_b = self.page_a.clone(), self.page_b.clone()
        pages = {id(self.page_a): page_a, id(self.page_b): page_b}
        out = torch.full(self.query.shape, SENTINEL, dtype=self.query.dtype)
        for r in rows:
            start, c, live = self.reqs[r]
            if not live:
                continue
            t0 = int(self.qsl[r])
            for kvh, page, off, bt in self.heads:
                region = ring.region(pages[id(page)][int(bt[r, 0])], off)
                hs = slice(kvh * G, (kvh + 1) * G)
                out[t0:t0 + c, hs] = ring_ops.ring_step(
                    region, ring, self.query[t0:t0 + c, hs], self.key[t0:t0 + c, kvh], self.value[t0:t0 + c, kvh],
                    start, scale=scale, compensation=compensation)
        return page_a, page_b, out

    def sum_rows(self, page: torch.Tensor) -> torch.Tensor:
        """bool [num_blocks, P]: the Ksum/Vsum rows of every region of `page`."""
        mask = torch.zeros(page.shape[:2], dtype=torch.bool)
        for _, p, off, _ in self.heads:
            if p is page:
                mask[:, off + self.ring.ksum_offset:off + self.ring.meta_offset] = True
        return mask


def _check(batch: Batch, ref, out, *, exact_sums: bool, sum_atol: float = 0.0):
    """The kernels' results (out, the device pages: copied back) against the oracle's `ref`."""
    ref_a, ref_b, ref_out = ref
    dtype = batch.ring.dtype
    out = out.cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    else:
        live = ref_out != SENTINEL
        assert torch.equal(out == SENTINEL, ~live)
        err = (out.float() - ref_out.float())[live].abs().max()
        assert err <= 2e-2 * ref_out.float()[live].abs().max(), err
    d = batch.ring.head_size
    for host_page, d_page, ref_page, before0 in ((batch.page_a, batch.d_page_a, ref_a, batch.null_a),
                                                 (batch.page_b, batch.d_page_b, ref_b, batch.null_b)):
        page = d_page.cpu()
        assert torch.equal(_bits(page[0]), before0), "the null block 0 was written"
        if not exact_sums:
            # the fp32 sums within rounding, then every other byte bit for bit
            rows = batch.sum_rows(host_page)
            got = page[rows].reshape(-1).view(torch.float32)
            want = ref_page[rows].reshape(-1).view(torch.float32)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=sum_atol, equal_nan=True)
            page = page.clone()
            page[rows] = ref_page[rows]
        diff = (_bits(page) != _bits(ref_page)).nonzero()
        assert diff.numel() == 0, (d, diff[:8])


def _snapshot_null(batch: Batch):
    batch.null_a = _bits(batch.d_page_a[0]).cpu().clone()
    batch.null_b = _bits(batch.d_page_b[0]).cpu().clone()


# --------------------------------------------------------------------------------------------------
# decode rows
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sinks,window,compensation,dtype", [
    (4, 8, "count", torch.float32),
    (4, 8, "single", torch.bfloat16),
    (0, 5, "none", torch.float32),       # no sinks
    (2, 1, "count", torch.float32),      # W = 1: the token is folded at once, never written
    (0, 1, "single", torch.float32),     # S = 0, W = 1: a first token folded into empty sums
], ids=["S4W8-count-fp32", "S4W8-single-bf16", "S0W5-none-fp32", "S2W1-count-fp32", "S0W1-single-fp32"])
def test_decode_rows_equal_ring_step(sinks, window, compensation, dtype):
    ring = RingLayout(sinks, window, D, dtype)
    s, w = sinks, window
    starts = sorted({1, max(s - 1, 1), max(s, 1), s + w - 1, s + w, s + 3 * w + 5})
    # live decodes, a one-token prompt (start 0), a null-block row, then 2 CUDA-graph padding rows
    reqs = [(st, 1, True) for st in starts] + [(0, 1, True), (5, 1, False)]
    batch = Batch(ring, reqs, seed=len(starts) + sinks + window, pad_rows=2)
    _snapshot_null(batch)
    scale = D ** -0.5
    ref = batch.oracle(range(len(reqs)), scale=scale, compensation=compensation)
    out = _full(batch.query.shape, dtype)
    res = ring_triton.ring_decode_rows(*batch.run_args(), len(reqs) + 2, *batch.qkv(), out, scale=scale,
                                       compensation=compensation)
    assert res is out
    # decode folds one row (k_sum + row, as ring_fold): the whole state bit for bit
    _check(batch, ref, out, exact_sums=True)


def test_decode_rows_strided_views():
    """query/key/value/out as non-contiguous views (a wider fused qkv buffer, a strided out)."""
    ring = RingLayout(4, 8, D, torch.float32)
    reqs = [(9, 1, True), (30, 1, True), (2, 1, True)]
    batch = Batch(ring, reqs, seed=5)
    _snapshot_null(batch)
    ref = batch.oracle(range(3), scale=0.3, compensation="single")
    t = batch.query.shape[0]
    qkv = torch.zeros(t, KV_HEADS * G + 2 * KV_HEADS + 1, D, device=DEVICE)
    query = qkv[:, :KV_HEADS * G]
    key = qkv[:, KV_HEADS * G:KV_HEADS * G + KV_HEADS]
    value = qkv[:, KV_HEADS * G + KV_HEADS + 1:]
    query.copy_(batch.query), key.copy_(batch.key), value.copy_(batch.value)
    big = _full((t, KV_HEADS * G, 2 * D))
    out = big[:, :, ::2]
    ring_triton.ring_decode_rows(*batch.run_args(), 3, query, key, value, out, scale=0.3, compensation="single")
    _check(batch, ref, out.contiguous(), exact_sums=True)
    big = big.cpu()
    assert torch.equal(big[:, :, 1::2], torch.full_like(big[:, :, 1::2], SENTINEL))


# --------------------------------------------------------------------------------------------------
# prefill chunks
# --------------------------------------------------------------------------------------------------

def _fold_atol(max_q_len: int, window: int) -> float:
    """Tolerance of the chunk sums: the kernel sums the step's folded rows in tiles (torch in another
    order); at most C + W - 1 rows of |x| < ~4 (randn) are folded in one step: 1e-5 of their total
    magnitude bounds the fp32 rounding of the differently ordered sums (rtol covers the stored sum)."""
    return 1e-5 * 4 * (max_q_len + window)


@pytest.mark.parametrize("sinks,window,compensation,dtype", [
    (4, 8, "count", torch.float32),
    (4, 8, "single", torch.bfloat16),
    (0, 5, "none", torch.float32),       # no sinks
    (2, 1, "count", torch.float32),      # W = 1
], ids=["S4W8-count-fp32", "S4W8-single-bf16", "S0W5-none-fp32", "S2W1-count-fp32"])
def test_chunks_equal_ring_step(sinks, window, compensation, dtype):
    ring = RingLayout(sinks, window, D, dtype)
    s, w = sinks, window
    reqs = [
        (7, 1, True),                   # a decode row before the chunks: not the chunk kernels'
        (0, 1, True),                   # C = 1, start 0 (a one-token prompt)
        (0, s + w + 5, True),           # C > W + S from start 0 (new or preempted request)
        (max(s - 1, 1), 2, True),       # C < W, inside the sinks
        (s + 1, w + 3, True),           # C > W
        (s + 3 * w + 2, 3, True),       # a chunk after a wrapped ring
        (s + 2 * w, 1, True),           # C = 1 on a wrapped ring
        (5, 3, False),                  # null block: skipped
    ]
    batch = Batch(ring, reqs, seed=11 + sinks + window)
    _snapshot_null(batch)
    scale = D ** -0.5
    chunk_rows = range(1, len(reqs))
    ref = batch.oracle(chunk_rows, scale=scale, compensation=compensation)
    out = _full(batch.query.shape, dtype)
    max_q_len = max(c for _, c, _ in reqs[1:])
    res = ring_triton.ring_chunks(*batch.run_args(), 1, len(reqs) - 1, max_q_len, *batch.qkv(), out, scale=scale,
                                  compensation=compensation)
    assert res is out
    _check(batch, ref, out, exact_sums=False, sum_atol=_fold_atol(max_q_len, w))


def test_chunks_long_chunk_several_query_blocks():
    """A chunk spanning several query blocks and key tiles (64 rows = 32 tokens per program, 32-key
    tiles), G = 2, and a second request continuing a wrapped ring, in one launch."""
    ring = RingLayout(4, 8, D, torch.float32)
    reqs = [(0, 70, True), (45, 37, True)]
    batch = Batch(ring, reqs, seed=21)
    _snapshot_null(batch)
    ref = batch.oracle(range(2), scale=0.25, compensation="count")
    out = _full(batch.query.shape)
    ring_triton.ring_chunks(*batch.run_args(), 0, 2, 70, *batch.qkv(), out, scale=0.25, compensation="count")
    _check(batch, ref, out, exact_sums=False, sum_atol=_fold_atol(70, 8))


# --------------------------------------------------------------------------------------------------
# ring_table validation, host-sync audit
# --------------------------------------------------------------------------------------------------

def test_ring_table_rejects_bad_heads():
    ring = RingLayout(4, 8, D, torch.float32)
    dev = DEVICE
    page = torch.zeros(5, ring.slots + 2, 2 * D, device=dev)
    bt = torch.zeros(4, 2, dtype=torch.int32, device=dev)
    Head = ring_triton.RingHead
    ring_triton.ring_table([Head(0, page, 2, bt)], dev, ring=ring)  # fits exactly
    with pytest.raises(ValueError, match="exceeds the page"):
        ring_triton.ring_table([Head(0, page, 3, bt)], dev, ring=ring)
    wide = torch.zeros(5, ring.slots + 2, 4 * D, device=dev)
    with pytest.raises(ValueError, match="contiguous rows"):
        ring_triton.ring_table([Head(0, wide[:, :, ::2], 0, bt)], dev, ring=ring)
    with pytest.raises(ValueError, match="contiguous rows"):
        ring_triton.ring_table([Head(0, torch.zeros(5, ring.slots + 2, D, device=dev), 0, bt)], dev, ring=ring)
    with pytest.raises(ValueError, match="int32"):
        ring_triton.ring_table([Head(0, page, 0, bt.long())], dev, ring=ring)
    with pytest.raises(ValueError, match="dtype"):
        ring_triton.ring_table([Head(0, page.bfloat16(), 0, bt)], dev, ring=ring)
    if dev != "cpu":
        # the table holds raw addresses: a page or block table on another device is refused
        with pytest.raises(ValueError, match="table on"):
            ring_triton.ring_table([Head(0, page.cpu(), 0, bt)], dev, ring=ring)
        with pytest.raises(ValueError, match="table on"):
            ring_triton.ring_table([Head(0, page, 0, bt.cpu())], dev, ring=ring)
    # a KV head the layer's key tensor lacks is refused at launch (host metadata only)
    table = ring_triton.ring_table([Head(3, page, 0, bt)], dev, ring=ring)
    q, kv = torch.zeros(1, 2 * G, D, device=dev), torch.zeros(1, 2, D, device=dev)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    lens = torch.tensor([5], dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="KV head 3"):
        ring_triton.ring_decode_rows(table, ring, qsl, lens, 1, q, kv, kv, q.clone(), scale=1.0, compensation="none")


_FORBIDDEN = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.lift_fresh", "aten.tensor",
              "aten.scalar_tensor", "aten._to_copy")


def _record_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as rec:
        fn()
    return rec.ops


def test_launches_do_no_host_sync(monkeypatch):
    """No .item()/bool()/tensor-from-list in the launch functions, and ONE launch per call with the
    caller's grid. First with the real kernels (interpreted, or compiled on CUDA: there also under
    CUDA's sync debug mode, which errors on any synchronizing call), then with stub launchers
    recording what happens outside the launch (no real launch)."""
    ring = RingLayout(4, 8, D, torch.float32)
    batch = Batch(ring, [(9, 1, True), (0, 5, True)], seed=3, pad_rows=1)
    out = torch.zeros_like(batch.d_query)

    def decode():
        ring_triton.ring_decode_rows(*batch.run_args(), 3, *batch.qkv(), out, scale=0.25, compensation="count")

    def chunks():
        ring_triton.ring_chunks(*batch.run_args(), 1, 1, 5, *batch.qkv(), out, scale=0.25, compensation="count")

    for fn in (decode, chunks):
        ops = _record_ops(fn)
        bad = [op for op in ops if op.startswith(_FORBIDDEN)]
        assert not bad, bad
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # compiled by now: the launches below are the steady state
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode()
            chunks()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()

    grids = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((self.name, tuple(grid)))
            return launch

    for name in ("_ring_decode_rows_kernel", "_ring_chunk_attend_kernel", "_ring_chunk_fold_write_kernel"):
        monkeypatch.setattr(ring_triton, name, Stub(name))
    assert _record_ops(decode) == []  # nothing at all outside the launch (the layout's constexprs are cached)
    assert grids == [("_ring_decode_rows_kernel", (3, 3))]
    grids.clear()
    assert _record_ops(chunks) == []
    # 5 tokens x G = 2 rows -> BLOCK_M 16, 8 tokens per program: one query block
    assert grids == [("_ring_chunk_attend_kernel", (1, 1, 3)), ("_ring_chunk_fold_write_kernel", (1, 3))]


# --------------------------------------------------------------------------------------------------
# CUDA graph (compiled on CUDA only)
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA-graph capture needs the compiled kernels on CUDA")
def test_decode_and_chunks_replayed_from_a_cuda_graph():
    """The three launches of a mixed step (decode row 0, chunk requests after it) captured in one
    CUDA graph and replayed: the same result as the oracle (scripts/gpu_graph_check.py replays a
    whole padded layer step several times)."""
    ring = RingLayout(4, 8, D, torch.bfloat16)
    reqs = [(7, 1, True), (0, 3, True), (13, 9, True), (30, 1, True), (5, 2, False)]
    batch = Batch(ring, reqs, seed=31, pad_rows=2)
    _snapshot_null(batch)
    scale = D ** -0.5
    ref = batch.oracle(range(len(reqs)), scale=scale, compensation="count")
    out = _full(batch.query.shape, torch.bfloat16)

    def step():
        ring_triton.ring_decode_rows(*batch.run_args(), 1, *batch.qkv(), out, scale=scale, compensation="count")
        ring_triton.ring_chunks(*batch.run_args(), 1, len(reqs) - 1, 9, *batch.qkv(), out, scale=scale,
                                compensation="count")

    saved = batch.d_page_a.clone(), batch.d_page_b.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    batch.d_page_a.copy_(saved[0]), batch.d_page_b.copy_(saved[1])
    out.fill_(SENTINEL)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    # capturing launched nothing: the pages are still the saved state
    assert torch.equal(_bits(batch.d_page_a), _bits(saved[0])) and torch.equal(_bits(batch.d_page_b), _bits(saved[1]))
    graph.replay()
    torch.cuda.synchronize()
    _check(batch, ref, out, exact_sums=False, sum_atol=_fold_atol(9, 8))
