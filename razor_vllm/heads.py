"""The head-mask file: which KV heads of which layers are retrieval heads.

Written by `razor-vllm profile`, read by the HF reference path, the evaluator and the vLLM backend at
engine start. The schema is versioned and validated with pydantic; `retrieval_heads[l]` is the
Huawei-tooling shape (`{layer: [kv_head, ...]}`) as a list indexed by layer.

A config is bound to one model through `ModelIdentity`: loading it for another model raises
`HeadConfigMismatch` naming both, because a head mask applied to the wrong model silently degrades
answers instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

# Structural fields of config.json that decide whether a head mask applies. Version stamps, dtypes and
# tokenizer ids are left out on purpose: re-saving a model with another transformers version, or
# vLLM's normalisation of the same config, must not invalidate its mask.
_FINGERPRINT_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size",
)


class HeadConfigError(ValueError):
    """A head config that cannot be used (missing, corrupt, or for another model)."""


class HeadConfigMismatch(HeadConfigError):
    """The head config was profiled on a different model."""


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def model_identity(cfg: Any) -> "ModelIdentity":
    """Identity of a model from its config (a dict from config.json or a transformers PretrainedConfig).

    Multimodal wrappers keep the decoder in `text_config`; that is what attention heads belong to.
    """
    text = _get(cfg, "text_config")
    if text is not None and _get(cfg, "num_hidden_layers") is None:
        cfg = text
    as_dict = cfg if isinstance(cfg, dict) else cfg.to_dict()
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // heads
    arch = (_get(cfg, "architectures") or [_get(cfg, "model_type")])[0]
    fp_src = {k: as_dict.get(k) for k in _FINGERPRINT_KEYS}
    fp_src["num_key_value_heads"], fp_src["head_dim"] = kv, head_dim
    fingerprint = hashlib.sha256(json.dumps(fp_src, sort_keys=True).encode()).hexdigest()[:16]
    return ModelIdentity(architecture=str(arch), num_layers=int(_get(cfg, "num_hidden_layers")),
                         num_attention_heads=int(heads), num_kv_heads=int(kv), head_dim=int(head_dim),
                         config_fingerprint=fingerprint)


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    config_fingerprint: str
    """sha256 prefix over the structural fields of config.json (see _FINGERPRINT_KEYS)."""

    def describe(self) -> str:
        return (f"{self.architecture} ({self.num_layers} layers, {self.num_attention_heads} query / "
                f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}, fingerprint {self.config_fingerprint})")


class ProfileSettings(BaseModel):
    """How the scores were produced (RazorAttention §3.2 defaults, as in Huawei's msModelSlim)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_random_tokens: int = 2500
    repeats: int = 4
    seed: int = 42
    id_low: int = 10000
    """Random ids are drawn uniformly from [id_low, id_high)."""
    id_high: int = 12500
    bos_token_id: int
    induction_ratio: float = Field(0.14, ge=0, le=1)
    echo_ratio: float = Field(0.01, ge=0, le=1)
    dtype: str = "float32"


class HeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelIdentity
    profile: ProfileSettings
    echo_scores: list[list[float]]
    """[layer][kv_head]: attention mass on the same token in earlier copies (max over the GQA group)."""
    induction_scores: list[list[float]]
    """[layer][kv_head]: attention mass on the token after earlier copies (max over the GQA group)."""
    retrieval_heads: list[list[int]]
    """[layer] -> sorted retrieval KV heads of that layer."""
    query_echo_scores: list[list[float]] | None = None
    """[layer][query_head]: the echo score of every query head before the max over its GQA group
    (profiles since this field exists; None in older configs). Serving never reads it: it is kept
    to compare KV-level with query-level selection (benchmarks/head_structure.py)."""
    query_induction_scores: list[list[float]] | None = None
    """[layer][query_head]: the same for the induction score."""

    @model_validator(mode="after")
    def _check_shapes(self) -> "HeadConfig":
        n_l, n_kv, n_q = self.model.num_layers, self.model.num_kv_heads, self.model.num_attention_heads
        for name in ("echo_scores", "induction_scores"):
            rows = getattr(self, name)
            if len(rows) != n_l or any(len(r) != n_kv for r in rows):
                raise ValueError(f"{name} must be {n_l} layers x {n_kv} KV heads")
        for name in ("query_echo_scores", "query_induction_scores"):
            rows = getattr(self, name)
            if rows is not None and (len(rows) != n_l or any(len(r) != n_q for r in rows)):
                raise ValueError(f"{name} must be {n_l} layers x {n_q} query heads")
        if len(self.retrieval_heads) != n_l:
            raise ValueError(f"retrieval_heads must list {n_l} layers, got {len(self.retrieval_heads)}")
        for layer, heads in enumerate(self.retrieval_heads):
            if sorted(set(heads)) != list(heads) or any(not 0 <= h < n_kv for h in heads):
                raise ValueError(f"retrieval_heads[{layer}] = {heads}: expected sorted unique KV heads in [0, {n_kv})")
        return self

    # -- derived views -------------------------------------------------------------------------
    @property
    def num_retrieval(self) -> int:
        return sum(len(h) for h in self.retrieval_heads)

    @property
    def retrieval_fraction(self) -> float:
        return self.num_retrieval / (self.model.num_layers * self.model.num_kv_heads)

    def is_retrieval(self, layer: int, kv_head: int) -> bool:
        return kv_head in self.retrieval_heads[layer]

    def check_matches(self, model_cfg: Any, *, source: str = "head config") -> None:
        """Raise HeadConfigMismatch unless this config was profiled on `model_cfg`'s architecture."""
        actual = model_identity(model_cfg)
        ours = self.model
        if (ours.num_layers, ours.num_kv_heads, ours.num_attention_heads, ours.head_dim,
                ours.config_fingerprint) != (actual.num_layers, actual.num_kv_heads,
                                             actual.num_attention_heads, actual.head_dim,
                                             actual.config_fingerprint):
            raise HeadConfigMismatch(
                f"{source} was profiled for {ours.describe()}, but the model is {actual.describe()}. "
                f"Profile this model with `razor-vllm profile MODEL_DIR --out heads.json` and pass that file."
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")

    def compare(self, ref: "HeadConfig", tol: float = 1e-6) -> list[str]:
        """Differences from `ref` (empty = same model, settings, heads, and scores within `tol`)."""
        problems = []
        if self.model != ref.model:
            problems.append(f"model identity differs: {self.model.describe()} vs {ref.model.describe()}")
        if self.profile != ref.profile:
            problems.append(f"profile settings differ: {self.profile} vs {ref.profile}")
        if self.retrieval_heads != ref.retrieval_heads:
            problems.append(f"retrieval heads differ: {self.retrieval_heads} vs {ref.retrieval_heads}")
        for name in ("echo_scores", "induction_scores", "query_echo_scores", "query_induction_scores"):
            a, b = getattr(self, name), getattr(ref, name)
            if (a is None) != (b is None):
                problems.append(f"{name}: present in only one of the two configs")
            elif a is not None and len(a) == len(b):
                worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
                if worst > tol:
                    problems.append(f"{name} differ by up to {worst:.3g} (> {tol})")
        return problems



def load_head_config(path: str | Path, model_cfg: Any | None = None) -> HeadConfig:
    """Load and validate a head config; with `model_cfg`, also check it belongs to that model.

    `path` may also name a config shipped in `configs/` (e.g. "smollm2-135m-instruct").
    """
    p = Path(path).expanduser()
    # a bare name (no directory, not a .json path) may be a shipped config; names can hold dots
    # ("qwen2.5-coder-0.5b-instruct"), so Path.suffix cannot tell
    if not p.exists() and p.suffix != ".json" and p.name == str(path):
        from razor_vllm.paths import repo_configs_dir

        shipped = repo_configs_dir() / f"{path}.json"
        if shipped.exists():
            p = shipped
    if not p.is_file():
        raise HeadConfigError(f"head config {str(path)!r} not found. Produce one with "
                              f"`razor-vllm profile MODEL_DIR --out heads.json`, or name a shipped config.")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HeadConfigError(f"head config {p} is not valid JSON ({e}); re-create it with `razor-vllm profile`") from e
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise HeadConfigError(f"head config {p} has schema_version {raw.get('schema_version')}; "
                              f"this razor-vllm reads version {SCHEMA_VERSION}. Re-profile the model.")
    try:
        cfg = HeadConfig.model_validate(raw)
    except ValidationError as e:
        raise HeadConfigError(f"head config {p} is invalid: {e}") from e
    if model_cfg is not None:
        cfg.check_matches(model_cfg, source=f"head config {p}")
    return cfg


def _top_count(ratio: float, total: int) -> int:
    # ceil so that any non-zero ratio selects at least one head (1% of 90 heads is still one echo
    # head); round first so 0.14 * 100 = 14.000000000000002 does not become 15.
    return min(total, math.ceil(round(ratio * total, 9)))


def select_retrieval_heads(induction: list[list[float]], echo: list[list[float]],
                           induction_ratio: float, echo_ratio: float) -> list[list[int]]:
    """Global top `induction_ratio` by induction plus top `echo_ratio` by echo, per layer, sorted.

    Ties are broken by (layer, head) so the selection is deterministic (Huawei's value-membership
    selection over-selects on ties; see method notes §2.4).
    """
    n_layers, n_kv = len(induction), len(induction[0])
    total = n_layers * n_kv
    cells = [(l, h) for l in range(n_layers) for h in range(n_kv)]
    chosen: set[tuple[int, int]] = set()
    for scores, ratio in ((induction, induction_ratio), (echo, echo_ratio)):
        ranked = sorted(cells, key=lambda c: (-scores[c[0]][c[1]], c[0], c[1]))
        chosen.update(ranked[:_top_count(ratio, total)])
    return [sorted(h for (l, h) in chosen if l == layer) for layer in range(n_layers)]
