"""Data-free retrieval-head profiling (RazorAttention §3.2, arXiv 2407.15891).

Input: BOS followed by `num_random_tokens` ids drawn uniformly from [id_low, id_high) (seed 42),
repeated `repeats` times. One forward pass; for every layer the post-RoPE queries and keys give
P = causal softmax(QK^T * scale). For each query head:

* echo score      = mean over queries i in copies 2..repeats of sum_m P[i, i - m*n]
                    (mass on the same token in earlier copies);
* induction score = mean over the same queries of sum_m P[i, i - m*n + 1]
                    (mass on the token that followed the earlier occurrences),

with n = num_random_tokens and m = 1, 2, ... while i - m*n >= 1. Under GQA a KV head takes the max
over its query heads (Huawei's `_max_every_group`). Retrieval heads are the global top
`induction_ratio` of KV heads by induction score plus the top `echo_ratio` by echo score.

Positions are compared, not token ids: 2,500 draws from 2,500 ids repeat tokens inside one copy, and
the method's definition is positional.

The forward pass is hooked through transformers' AttentionInterface, so every decoder whose attention
goes through it is supported; the scores are computed layer by layer in query chunks, so the 10k x 10k
attention matrix is never materialised for all heads at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from razor_vllm.heads import HeadConfig, ProfileSettings, model_identity, select_retrieval_heads


class UnsupportedModelError(ValueError):
    """The model is not a RoPE decoder whose attention the profiler can observe."""


_DEFAULTS = {name: f.default for name, f in ProfileSettings.model_fields.items() if name != "bos_token_id"}


@dataclass(frozen=True)
class ProfileOptions:
    """Settings of one profiling run. The defaults (the paper's / Huawei's) have one home:
    `razor_vllm.heads.ProfileSettings`, the persisted subset."""

    num_random_tokens: int = _DEFAULTS["num_random_tokens"]
    repeats: int = _DEFAULTS["repeats"]
    seed: int = _DEFAULTS["seed"]
    id_low: int = _DEFAULTS["id_low"]
    id_high: int = _DEFAULTS["id_high"]
    induction_ratio: float = _DEFAULTS["induction_ratio"]
    echo_ratio: float = _DEFAULTS["echo_ratio"]
    dtype: str = _DEFAULTS["dtype"]
    """Forward-pass dtype; the scores themselves are always computed in fp32. float32 by default:
    bf16 weights upcast exactly, the result does not depend on whether the CPU has native bf16
    arithmetic, and on CPUs without AVX512-BF16/AMX it avoids emulated bf16 (docs/performance.md)."""
    chunk_size: int = 256
    """Query rows per score chunk of the unfused path: bounds the peak at chunk x seq_len x query
    heads x 4 bytes."""
    fused: bool = True
    """Take the scores from the fused attention pass where the layer is plain causal attention on CPU
    (`flash_head_scores`); False always uses the separate chunked pass (`head_scores`)."""
    device: str = "cpu"
    """Where the forward runs: "cpu", a torch device ("cuda", "cuda:1"), or "auto" (the layers spread
    over every visible GPU by accelerate's device_map, for models larger than one GPU). Off CPU the
    scores come from the chunked pass (`head_scores`, any device), the output from SDPA."""
    progress: bool = True


def calibration_ids(bos_token_id: int, opts: ProfileOptions) -> torch.Tensor:
    """[1 + n * repeats] int64: BOS, then the same n random ids `repeats` times."""
    g = torch.Generator().manual_seed(opts.seed)
    seg = torch.randint(opts.id_low, opts.id_high, (opts.num_random_tokens,), generator=g)
    return torch.cat([torch.tensor([bos_token_id]), seg.repeat(opts.repeats)])


def head_scores(q: torch.Tensor, k: torch.Tensor, scale: float, n: int, *, chunk_size: int = 256,
                attention_mask: torch.Tensor | None = None, softcap: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction score of every query head.

    q: [Hq, T, D] post-RoPE queries; k: [Hkv, T, D] post-RoPE keys, T = 1 + n * repeats.
    attention_mask: optional [T, T] bool (True = may attend) or additive float mask; None = causal.
    Returns (echo, induction), each [Hq] fp32.

    Only a few entries of each row of P are needed, so P itself is never formed: per query chunk we
    compute the row log-sum-exp of the logits (one matmul + one reduction) and read
    P[i, j] = exp(logit[i, j] - lse[i]) at the echo/induction columns.
    """
    hq, t, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    kf = k.float()
    dev = q.device  # index bookkeeping stays on the host; masks and sums live with the logits
    echo = torch.zeros(hq, dtype=torch.float64, device=dev)
    induction = torch.zeros(hq, dtype=torch.float64, device=dev)
    first = 1 + n  # queries in copies 2.. (0-based copy index >= 1)
    for a in range(first, t, chunk_size):
        b = min(t, a + chunk_size)
        c = b - a
        qc = q[:, a:b].float().reshape(hkv, group * c, d)  # GQA: one matmul per KV head, no K copies
        logits = torch.matmul(qc, kf[:, :b].transpose(1, 2)).mul_(scale).view(hq, c, b)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        rows = torch.arange(a, b)
        if attention_mask is None:
            # keys [0, a) are visible to every row of the chunk; only the diagonal block needs masking
            logits[:, :, a:].masked_fill_((torch.arange(a, b)[None, :] > rows[:, None]).to(dev), float("-inf"))
        elif attention_mask.dtype == torch.bool:
            logits.masked_fill_(~attention_mask[a:b, :b].to(dev), float("-inf"))
        else:
            logits += attention_mask[a:b, :b].to(dev).float()
        lse = torch.logsumexp(logits, dim=-1)  # [Hq, c]
        for m in range(1, (t - 1) // n + 1):
            src = rows - m * n  # earlier occurrence of the same position in the copy
            ok = src >= 1
            if not ok.any():
                continue
            r_ok, s_ok = (rows[ok] - a), src[ok]
            lse_ok = lse[:, r_ok]
            echo += torch.exp(logits[:, r_ok, s_ok] - lse_ok).sum(dim=1).double()
            induction += torch.exp(logits[:, r_ok, s_ok + 1] - lse_ok).sum(dim=1).double()
    num_queries = t - first
    return (echo / num_queries).float(), (induction / num_queries).float()


def gathered_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, n: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction score of every query head, given each row's log-sum-exp.

    q: [Hq, T, D] post-RoPE queries; k: [Hkv, T, D] post-RoPE keys; lse: [Hq, T] fp32 log-sum-exp of
    each causal row of QK^T * scale (what a flash-attention kernel returns beside its output).
    Returns (echo, induction), each [Hq] fp32.

    P[i, j] = exp(q_i . k_j * scale - lse_i), and each query needs only the columns i - m*n (echo)
    and i - m*n + 1 (induction), so the scores cost O(T * D) per head on top of the attention itself.
    """
    hq, t, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    first = 1 + n
    echo = torch.zeros(hq, dtype=torch.float64, device=q.device)
    induction = torch.zeros(hq, dtype=torch.float64, device=q.device)
    qg = q.float().view(hkv, group, t, d)
    kf = k.float()[:, None]  # [Hkv, 1, T, D], broadcast over the group
    for m in range(1, (t - 1) // n + 1):
        # queries i in [a, t) have an m-th earlier occurrence i - m*n >= 1: contiguous slices, no gathers
        a = max(first, m * n + 1)
        if a >= t:
            continue
        lse_rows = lse[:, a:].float()
        for shift, acc in ((0, echo), (1, induction)):
            keys = kf[:, :, a - m * n + shift:t - m * n + shift]
            logit = (qg[:, :, a:] * keys).sum(dim=-1).view(hq, t - a) * scale
            acc += torch.exp(logit - lse_rows).sum(dim=1).double()
    num_queries = t - first
    return (echo / num_queries).float(), (induction / num_queries).float()


def flash_head_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention output plus echo/induction scores from one fused attention pass.

    q: [Hq, T, D]; k, v: [Hkv, T, D]. Returns (out [Hq, T, D] in q's dtype, echo [Hq], induction [Hq]).
    The CPU flash-attention kernel returns each row's log-sum-exp beside the output, so the forward
    pass the model needs anyway yields the softmax normaliser; `gathered_scores` then reads the few
    columns the scores need. This replaces a second, separate QK^T pass over the 10k x 10k logits.
    Causal masks without softcapping only; `head_scores` handles the rest.
    """
    group = q.shape[0] // k.shape[0]
    ke = k.repeat_interleave(group, dim=0)[None]
    ve = v.repeat_interleave(group, dim=0)[None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], ke, ve, 0.0, True, attn_mask=None, scale=scale)[:2]
    echo, induction = gathered_scores(q, k, lse[0], scale, n)
    return out[0], echo, induction


def max_over_groups(per_q_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq] -> [Hkv]: a KV head is as strong as its strongest query head."""
    return per_q_head.view(num_kv_heads, -1).amax(dim=1)


@dataclass
class _Recorder:
    """Receives each layer's post-RoPE Q/K from the attention hook and reduces them to scores."""

    n: int
    chunk_size: int
    softcap: float | None
    fused: bool = True
    """Use `flash_head_scores` where it applies (False forces the chunked `head_scores` path)."""
    bar: Any = None
    echo: dict[int, torch.Tensor] = field(default_factory=dict)
    induction: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no layer_idx; cannot attribute scores")
        if layer in self.echo:
            raise UnsupportedModelError(f"layer {layer} ran twice in one forward pass (shared attention modules?)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if attention_mask is None and not self.softcap and query.device.type == "cpu" and self.fused:
            # Plain causal attention: one fused pass gives the output and the scores.
            out, e, i = flash_head_scores(query[0], key[0], value[0], scale, self.n)
            result = (out.transpose(0, 1)[None].contiguous(), None)
        else:
            # Explicit masks (sliding-window layers, padding), softcapping, or non-CPU tensors: score
            # with the chunked pass and let transformers' SDPA produce the output.
            mask = attention_mask[0, 0] if attention_mask is not None and attention_mask.dim() == 4 \
                else attention_mask
            e, i = head_scores(query[0], key[0], scale, self.n, chunk_size=self.chunk_size,
                               attention_mask=mask, softcap=self.softcap)
            result = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        self.echo[layer], self.induction[layer] = e, i
        if self.bar is not None:
            self.bar.update(1)
        return result


_HOOK_NAME = "razor_profile"


def _check_rope_decoder(model, arch: str) -> None:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(text_cfg, "alibi", False) or "alibi" in str(getattr(text_cfg, "position_embedding_type", "")):
        raise UnsupportedModelError(
            f"{arch} uses ALiBi: RazorAttention gives ALiBi models per-head windows instead of retrieval "
            f"heads, which razor-vllm does not implement yet.")
    has_rope = any("rotary" in name.lower() or "rope" in type(mod).__name__.lower()
                   for name, mod in model.named_modules())
    if not has_rope:
        raise UnsupportedModelError(
            f"{arch} is not a RoPE decoder (no rotary embedding module found). The profiler supports RoPE "
            f"decoders in transformers such as Llama, Qwen2, Mistral and Gemma.")


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM for profiling/evaluation, with clear errors for bad input. `device`: as
    `ProfileOptions.device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist; fetch one with "
                                f"`razor-vllm fetch-model smollm2-135m-instruct`")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory")
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types for unreadable configs
        raise ValueError(f"cannot read {path / 'config.json'}: {e}") from e
    placement = _placement(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa",
                                                     **placement)
    except ValueError as e:
        arch = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
        raise UnsupportedModelError(f"{arch} cannot be loaded as a causal LM by transformers: {e}") from e
    model.eval()
    return model


def _placement(device: str) -> dict:
    """from_pretrained keyword arguments for `device`, refused early with the fix when unusable."""
    if device == "cpu":
        return {}
    try:
        kind = "auto" if device == "auto" else torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("auto", "cuda"):
        raise ValueError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA device (torch {torch.__version__}, "
                         f"cuda {torch.version.cuda}); use --device cpu")
    if device == "auto":
        # every visible GPU, layer by layer (accelerate): a 70B model in bf16 needs ~140 GB
        return {"device_map": "auto"}
    return {"device_map": {"": device}}


def _input_device(model) -> torch.device:
    """Where the input ids go: the embedding's device (the first GPU of a device_map)."""
    return model.get_input_embeddings().weight.device


def profile_model(model, opts: ProfileOptions = ProfileOptions(), *, bos_token_id: int | None = None) -> HeadConfig:
    """Score every (layer, KV head) of `model` and select the retrieval heads."""
    from razor_vllm.eval.hf_attention import use_attention

    cfg = model.config
    ident = model_identity(cfg)
    arch = ident.architecture
    _check_rope_decoder(model, arch)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    bos = bos_token_id if bos_token_id is not None else getattr(text_cfg, "bos_token_id", None)
    if bos is None:
        raise ValueError(f"{arch} config has no bos_token_id; pass bos_token_id explicitly")
    vocab = getattr(text_cfg, "vocab_size", None)
    if vocab is not None and opts.id_high > vocab:
        raise ValueError(f"random id range [{opts.id_low}, {opts.id_high}) exceeds the vocabulary ({vocab}); "
                         f"pass --id-low/--id-high inside it")
    ids = calibration_ids(int(bos), opts)[None].to(_input_device(model))

    from tqdm.auto import tqdm

    bar = tqdm(total=ident.num_layers, desc="profiling layers", disable=not opts.progress)
    rec = _Recorder(n=opts.num_random_tokens, chunk_size=opts.chunk_size, fused=opts.fused,
                    softcap=getattr(text_cfg, "attn_logit_softcapping", None), bar=bar)
    # use_attention registers SDPA's mask builder too: sliding-window layers (Gemma-3) keep their
    # masks, plain causal layers get None (the fused scoring path).
    try:
        with use_attention(model, _HOOK_NAME, rec), torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        bar.close()
    if sorted(rec.echo) != list(range(ident.num_layers)):
        raise UnsupportedModelError(
            f"{arch}: only layers {sorted(rec.echo)} of {ident.num_layers} went through transformers' "
            f"AttentionInterface, so their queries and keys cannot be observed")

    kv = ident.num_kv_heads
    echo = [max_over_groups(rec.echo[l].cpu(), kv).tolist() for l in range(ident.num_layers)]
    induction = [max_over_groups(rec.induction[l].cpu(), kv).tolist() for l in range(ident.num_layers)]
    settings = ProfileSettings(num_random_tokens=opts.num_random_tokens, repeats=opts.repeats, seed=opts.seed,
                               id_low=opts.id_low, id_high=opts.id_high, bos_token_id=int(bos),
                               induction_ratio=opts.induction_ratio, echo_ratio=opts.echo_ratio, dtype=opts.dtype)
    return HeadConfig(model=ident, profile=settings, echo_scores=echo, induction_scores=induction,
                      retrieval_heads=select_retrieval_heads(induction, echo, opts.induction_ratio, opts.echo_ratio),
                      query_echo_scores=[rec.echo[l].cpu().tolist() for l in range(ident.num_layers)],
                      query_induction_scores=[rec.induction[l].cpu().tolist() for l in range(ident.num_layers)])


def plot_head_config(cfg: HeadConfig, path: str | Path) -> None:
    """Heatmaps (layers x KV heads) of both scores; retrieval heads are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * cfg.model.num_kv_heads, 0.25 * cfg.model.num_layers + 2))
    for ax, (title, data) in zip(axes, (("induction score", cfg.induction_scores), ("echo score", cfg.echo_scores))):
        arr = np.array(data)
        im = ax.imshow(arr, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(arr.max())))
        for layer, heads in enumerate(cfg.retrieval_heads):
            for h in heads:
                ax.add_patch(plt.Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        ax.set_title(title)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(cfg.model.num_kv_heads))
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{cfg.model.architecture}: {cfg.num_retrieval} retrieval KV heads (red) of "
                 f"{cfg.model.num_layers * cfg.model.num_kv_heads}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_head_table(cfg: HeadConfig, top: int = 20) -> str:
    """The strongest heads as a text table, retrieval heads marked."""
    rows = [(cfg.induction_scores[l][h], cfg.echo_scores[l][h], l, h)
            for l in range(cfg.model.num_layers) for h in range(cfg.model.num_kv_heads)]
    rows.sort(key=lambda r: (-max(r[0], r[1]), r[2], r[3]))
    med_ind = sorted(r[0] for r in rows)[len(rows) // 2]
    lines = [f"{cfg.model.describe()}",
             f"retrieval KV heads: {cfg.num_retrieval}/{len(rows)} ({100 * cfg.retrieval_fraction:.1f}%); "
             f"median induction score {med_ind:.4f}",
             f"{'layer':>5} {'kv':>3} {'induction':>10} {'echo':>8}  retrieval"]
    for ind, echo, l, h in rows[:top]:
        lines.append(f"{l:>5} {h:>3} {ind:>10.4f} {echo:>8.4f}  {'yes' if cfg.is_retrieval(l, h) else ''}")
    return "\n".join(lines)


def run_profile(model_dir: str | Path, out: str | Path | None, opts: ProfileOptions = ProfileOptions(),
                plot: str | Path | None = None) -> HeadConfig:
    t0 = time.perf_counter()
    model = load_model(model_dir, opts.dtype, opts.device)
    cfg = profile_model(model, opts)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        cfg.save(out)
    if plot is not None:
        plot_head_config(cfg, plot)
    if opts.progress:
        print(f"profiled in {time.perf_counter() - t0:.1f} s")
    return cfg
