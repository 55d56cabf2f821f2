"""`razor-vllm eval`: long-context accuracy of RazorAttention against baselines at the same KV budget.

Protocol (stated in every record): the context is prefilled exactly, in one chunk, with stock
attention; the question (and the chat template's assistant header) is then fed as a second chunk that
attends to the *compressed* context, and the answer is decoded greedily under compression. This is
the strict protocol: the heads see the question only after the context has been compressed, as with
kvpress's compress-then-ask evaluation. `--protocol exact-prefill` instead prefills context and
question together exactly and compresses only during decoding (RazorAttention's serving default
when the whole prompt fits one prefill chunk).

One exact prefill per sample is shared by every method, so a sweep costs one long prefill plus a
short compressed continuation per method.

Methods, all at the budget of the razor setting they belong to:
* full       — the uncompressed cache;
* razor      — retrieval heads full, the rest sinks + window + compensation (each requested weighting);
* random     — the same number of heads as razor, drawn at random (seeded), same window/compensation;
* streaming  — StreamingLLM: no retrieval heads, sinks + a window sized so the KV kept equals razor's.
"""

from __future__ import annotations

import json
import random as _random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from razor_vllm.config import RazorPolicy
from razor_vllm.heads import HeadConfig
from razor_vllm.heads import select_retrieval_heads

PROTOCOLS = {
    "question-compressed": "exact prefill of the context (one chunk); question as a second chunk over the "
                           "compressed context; greedy decode under compression",
    "exact-prefill": "exact prefill of context + question (one chunk); greedy decode under compression",
}


@dataclass(frozen=True)
class RazorSetting:
    window: int
    compensation: str
    induction_ratio: float
    echo_ratio: float


@dataclass
class Record:
    task: str
    length: int
    method: str
    accuracy: float
    kv_fraction: float
    n: int
    window: int | None
    sinks: int
    compensation: str | None
    induction_ratio: float | None
    echo_ratio: float | None
    retrieval_fraction: float
    protocol: str
    dtype: str
    seconds: float


def _random_heads(n_layers: int, n_kv: int, count: int, seed: int) -> list[list[int]]:
    cells = [(l, h) for l in range(n_layers) for h in range(n_kv)]
    pick = _random.Random(seed).sample(cells, count)
    return [sorted(h for (l, h) in pick if l == layer) for layer in range(n_layers)]


def build_policies(head_cfg: HeadConfig, methods: Iterable[str], settings: Iterable[RazorSetting], sinks: int,
                   seq_len: int, seed: int = 0) -> list[tuple[str, RazorSetting | None, RazorPolicy | None]]:
    """(method name, setting, policy) for one sample of `seq_len` tokens; policy None = full cache."""
    n_layers, n_kv = head_cfg.model.num_layers, head_cfg.model.num_kv_heads
    methods = list(methods)
    out: list[tuple[str, RazorSetting | None, RazorPolicy | None]] = []
    settings = list(settings)
    streaming_windows: set[int] = set()
    if "full" in methods:
        out.append(("full", None, None))
    for s in settings:
        heads = select_retrieval_heads(head_cfg.induction_scores, head_cfg.echo_scores, s.induction_ratio,
                                       s.echo_ratio)
        razor = RazorPolicy.build(heads, n_kv, sinks=sinks, window=s.window, compensation=s.compensation)
        if "razor" in methods:
            out.append(("razor", s, razor))
        # The random-heads control is run once per window (at the first weighting and ratio listed):
        # it answers "do *these* heads matter", which does not need every weighting.
        first = settings[0]
        if "random" in methods and (s.compensation, s.induction_ratio) == (first.compensation, first.induction_ratio):
            count = sum(len(h) for h in heads)
            out.append(("random", s, RazorPolicy.build(_random_heads(n_layers, n_kv, count, seed), n_kv,
                                                       sinks=sinks, window=s.window, compensation=s.compensation)))
        if "streaming" in methods:
            budget_tokens = round(razor.kv_fraction(seq_len) * seq_len)
            w = max(1, budget_tokens - sinks)
            if w in streaming_windows:  # settings differing only in weighting share one budget
                continue
            streaming_windows.add(w)
            out.append(("streaming", s, RazorPolicy.build([[]] * n_layers, n_kv, sinks=sinks, window=w,
                                                          compensation="none")))
    return out


def run_eval(model_dir: str | Path, head_cfg: HeadConfig, *, tasks: list[str], lengths: list[int],
             methods: list[str], settings: list[RazorSetting], sinks: int = 4, depths: int = 4,
             protocol: str = "question-compressed", seed: int = 0, progress: bool = True,
             dtype: str = "float32", checkpoint: str | Path | None = None) -> tuple[list[Record], list[dict]]:
    """Run the suite; returns (aggregated records, per-sample rows).

    With `checkpoint`, the JSON outputs are rewritten after every sample, so a long sweep that is
    interrupted still leaves every finished sample on disk.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks as suite
    from razor_vllm.eval.hf_razor import continue_greedy, prefill
    from razor_vllm.profile.profiler import load_model

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    unknown = set(methods) - {"full", "razor", "random", "streaming"}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from full, razor, random, streaming")
    model = load_model(model_dir, dtype)
    head_cfg.check_matches(model.config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = [t for t in {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if isinstance(t, int)]
    samples = suite.make_suite(tasks, lengths, depths, seed, tok)
    rows: list[dict] = []
    for sample in tqdm(samples, desc="eval samples", disable=not progress):
        ctx, question = suite.build_prompt_ids(sample, tok)
        seq_len = len(ctx) + len(question)
        t0 = time.perf_counter()
        if protocol == "question-compressed":
            cache, _ = prefill(model, ctx)
            feed, first = question, None
        else:
            cache, first = prefill(model, ctx + question)
            feed = []
        t_prefill = time.perf_counter() - t0
        for name, setting, policy in build_policies(head_cfg, methods, settings, sinks, seq_len, seed):
            t1 = time.perf_counter()
            # Stopping once every answer is in the output cannot change the verdict (string_match_all
            # only looks for the answers) and saves most of the decode steps.
            gen = continue_greedy(model, cache, feed, sample.max_new_tokens, policy, eos, first_logits=first,
                                  stop=lambda toks: suite.is_correct(sample, tok.decode(toks, skip_special_tokens=True)))
            text = tok.decode(gen, skip_special_tokens=True)
            rows.append({
                "task": sample.task, "length": sample.length, "depth": sample.depth, "seed": sample.seed,
                "method": name, "setting": asdict(setting) if setting else None,
                "kv_fraction": policy.kv_fraction(seq_len) if policy else 1.0,
                "retrieval_fraction": (sum(len(h) for h in policy.retrieval_heads) /
                                       (policy.num_layers * policy.num_kv_heads)) if policy else 1.0,
                "window": policy.window if policy else None,
                "correct": suite.is_correct(sample, text), "score": suite.score(sample, text),
                "output": text, "seq_len": seq_len,
                "seconds": time.perf_counter() - t1 + (t_prefill if name == "full" else 0.0),
            })
        del cache
        if checkpoint is not None:
            write_json(aggregate(rows, sinks, protocol, dtype), rows, checkpoint)
    return aggregate(rows, sinks, protocol, dtype), rows


def aggregate(rows: list[dict], sinks: int, protocol: str, dtype: str) -> list[Record]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        s = r["setting"] or {}
        key = (r["task"], r["length"], r["method"], s.get("window"), s.get("compensation"),
               s.get("induction_ratio"), s.get("echo_ratio"))
        groups.setdefault(key, []).append(r)
    out = []
    for (task, length, method, window, comp, ir, er), rs in groups.items():
        out.append(Record(
            task=task, length=length, method=method, accuracy=sum(r["correct"] for r in rs) / len(rs),
            kv_fraction=sum(r["kv_fraction"] for r in rs) / len(rs), n=len(rs),
            window=rs[0]["window"], sinks=sinks, compensation=comp if method != "streaming" else "none",
            induction_ratio=ir if method in ("razor", "random") else None,
            echo_ratio=er if method in ("razor", "random") else None,
            retrieval_fraction=rs[0]["retrieval_fraction"], protocol=PROTOCOLS[protocol], dtype=dtype,
            seconds=sum(r["seconds"] for r in rs)))
    return out


def label(r: Record) -> str:
    if r.method == "full":
        return "full"
    base = f"{r.method} w={r.window}"
    if r.method in ("razor", "random"):
        base += f" {r.compensation} ir={r.induction_ratio}"
    return base


def format_table(records: list[Record]) -> str:
    lines = [f"{'task':<16} {'len':>5} {'method':<40} {'acc':>5} {'kv':>6} {'n':>3}"]
    for r in sorted(records, key=lambda r: (r.task, r.length, r.method != "full", label(r))):
        lines.append(f"{r.task:<16} {r.length:>5} {label(r):<40} {r.accuracy:>5.2f} {r.kv_fraction:>6.3f} {r.n:>3}")
    return "\n".join(lines)


def plot(records: list[Record], path: str | Path) -> None:
    """Accuracy (mean over tasks) against KV fraction, one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r.length for r in records})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    markers = {"full": "*", "razor": "o", "random": "x", "streaming": "s"}
    for ax, length in zip(axes[0], lengths):
        by_label: dict[str, list[Record]] = {}
        for r in records:
            if r.length == length:
                by_label.setdefault(label(r), []).append(r)
        for lab, rs in sorted(by_label.items()):
            acc = sum(r.accuracy for r in rs) / len(rs)
            kv = sum(r.kv_fraction for r in rs) / len(rs)
            ax.scatter(kv, acc, marker=markers[rs[0].method], s=60, label=lab)
        ax.set_title(f"{length} tokens (mean over tasks)")
        ax.set_xlabel("KV kept / full")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(0, 1.05)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(records: list[Record], rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(r) for r in records], indent=1))
    Path(path).with_suffix(".samples.json").write_text(json.dumps(rows, indent=1))
