"""`razor-vllm eval`: paired long-context accuracy of RazorAttention against baselines, both protocols.

Two protocols, both measured from one exact prefill of the context per prompt:

* ``exact-prefill`` — RazorAttention's own: context + question prefilled exactly; the answer is
  decoded under compression (what vLLM does when the whole prompt fits one prefill chunk).
* ``question-compressed`` — the question is a second chunk that already attends to the compressed
  context, then the answer is decoded under compression (what vLLM's chunked prefill gives a prompt
  longer than one chunk, and kvpress's compress-then-ask protocol).

The context is prefilled once (stock attention). For the question-compressed protocol every method
feeds the question through its own compressed view of that cache; for exact-prefill the question is
fed once with stock attention and every method decodes from there. The HF cache is cropped back
after each continuation, so one prefill serves every method of both protocols: the comparison is
paired (same prompts, greedy decoding).

Methods, all at the budget of the razor setting they belong to:
* full       — the uncompressed cache;
* razor      — retrieval heads full, the rest sinks + window + compensation;
* random     — the same number of heads as razor, drawn at random (seeded), same sinks/window/weighting;
* streaming  — StreamingLLM: no retrieval heads, same sinks, a window sized so the KV kept equals razor's.

Rows (one per prompt x protocol x method) are appended to a JSONL file as each prompt finishes; a
re-run with the same file skips every prompt already complete (resume). `summarize` turns rows into
the records of docs/results/accuracy_summary.json.
"""

from __future__ import annotations

import json
import random as _random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from razor_vllm.config import SERVING_DEFAULTS, RazorPolicy
from razor_vllm.heads import HeadConfig, ProfileSettings, select_retrieval_heads

PROTOCOLS = {
    "exact-prefill": "exact prefill of context + question; greedy decode under compression",
    "question-compressed": "exact prefill of the context; the question as a second chunk over the compressed "
                           "context; greedy decode under compression",
}
METHODS = ("full", "razor", "random", "streaming")

MIN_FULL_ACCURACY = 0.30
"""Tasks the full model answers below this are reported but kept out of averages: they cannot
separate methods."""

_PROFILE = ProfileSettings.model_fields


@dataclass(frozen=True)
class RazorSetting:
    """One razor operating point (defaults: the serving defaults and the profiler's ratios)."""

    window: int = SERVING_DEFAULTS["window"]
    compensation: str = SERVING_DEFAULTS["compensation"]
    induction_ratio: float = _PROFILE["induction_ratio"].default
    echo_ratio: float = _PROFILE["echo_ratio"].default
    sinks: int = SERVING_DEFAULTS["sinks"]

    def policy(self, head_cfg: HeadConfig) -> RazorPolicy:
        """razor at this setting: heads re-selected from `head_cfg`'s scores at this setting's ratios
        (as `razor-vllm select` does), this setting's sinks, window and weighting."""
        heads = select_retrieval_heads(head_cfg.induction_scores, head_cfg.echo_scores, self.induction_ratio,
                                       self.echo_ratio)
        return RazorPolicy.build(heads, head_cfg.model.num_kv_heads, sinks=self.sinks, window=self.window,
                                 compensation=self.compensation)


def settings_grid(sinks: list[int], windows: list[int], compensations: list[str], ratios: list[float],
                  echo_ratio: float, one_at_a_time: bool) -> list[RazorSetting]:
    """The cartesian product, or (one_at_a_time) the first value of each list plus every single change
    of one of them: the coarse stage of a staged sweep."""
    base = RazorSetting(windows[0], compensations[0], ratios[0], echo_ratio, sinks[0])
    if not one_at_a_time:
        return [RazorSetting(w, c, r, echo_ratio, s) for s in sinks for w in windows for c in compensations
                for r in ratios]
    out = [base]
    for name, values in (("sinks", sinks), ("window", windows), ("compensation", compensations),
                         ("induction_ratio", ratios)):
        for v in values[1:]:
            out.append(RazorSetting(**{**asdict(base), name: v}))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Method:
    name: str
    setting: RazorSetting | None
    policy: RazorPolicy | None
    label_window: int | None = None
    """streaming: the window its label names (the budget at the run's nominal length), when the
    policy's own window (matched to this prompt's token count) differs from it by a token or two."""

    @property
    def label(self) -> str:
        if self.policy is None:
            return "full"
        p = self.policy
        if self.name == "streaming":
            return f"streaming s{p.sinks} w{p.window if self.label_window is None else self.label_window}"
        return f"{self.name} s{p.sinks} w{p.window} {p.compensation} r{self.setting.induction_ratio:g}"


def _random_heads(n_layers: int, n_kv: int, count: int, seed: int) -> list[list[int]]:
    cells = [(l, h) for l in range(n_layers) for h in range(n_kv)]
    pick = _random.Random(seed).sample(cells, count)
    return [sorted(h for (l, h) in pick if l == layer) for layer in range(n_layers)]


def build_methods(head_cfg: HeadConfig, methods: Iterable[str], settings: Iterable[RazorSetting], seq_len: int,
                  seed: int = 0, controls: str = "all", label_len: int | None = None) -> list[Method]:
    """The methods to run on one prompt of `seq_len` tokens, deduplicated by label.

    Controls (random, streaming) are built for every setting (``controls="all"``) or only for the
    first one (``"first"``); a control shared by two settings (streaming for two weightings of one
    budget) runs once. StreamingLLM's window matches razor's KV on this prompt exactly; its label
    names the window at `label_len` (the run's nominal length, default `seq_len`), so that one
    control keeps one label over prompts whose token counts differ by a few tokens.
    """
    n_layers, n_kv = head_cfg.model.num_layers, head_cfg.model.num_kv_heads
    methods = set(methods)
    unknown = methods - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    out: dict[str, Method] = {}
    if "full" in methods:
        out["full"] = Method("full", None, None)
    settings = list(settings)
    for i, s in enumerate(settings):
        razor = s.policy(head_cfg)
        cand = []
        if "razor" in methods:
            cand.append(Method("razor", s, razor))
        if controls == "all" or i == 0:
            if "random" in methods:
                count = sum(map(len, razor.retrieval_heads))
                cand.append(Method("random", s, RazorPolicy.build(
                    _random_heads(n_layers, n_kv, count, seed), n_kv, sinks=s.sinks, window=s.window,
                    compensation=s.compensation)))
            if "streaming" in methods:
                def window(n: int) -> int:
                    return max(1, round(razor.kv_fraction(n) * n) - s.sinks)

                cand.append(Method("streaming", s, RazorPolicy.build(
                    [[]] * n_layers, n_kv, sinks=s.sinks, window=window(seq_len), compensation="none"),
                    label_window=None if label_len is None else window(label_len)))
        for m in cand:
            out.setdefault(m.label, m)
    return list(out.values())


_GOLDEN = 0.6180339887498949


def sequence_depth(i: int) -> float:
    """Needle depth of prompt i: the golden-ratio sequence, so that any first k prompts spread over
    the context and a run can grow its n later (prompt i never changes)."""
    return round((0.5 + i * _GOLDEN) % 1.0, 6)


def sequence_suite(tasks, lengths, n: int, seed: int, tokenizer) -> list[tuple[int, "Sample"]]:
    """(index, sample) for n prompts per (task, length), round-robin over the cells, so a run stopped
    early has about the same n in every cell. Prompt i of a cell is the same for every n."""
    from razor_vllm.eval import tasks as suite
    from razor_vllm.eval.words import stable_seed

    out = []
    for i in range(n):
        for task in tasks:
            for length in lengths:
                s = stable_seed("sequence", seed, task, length, i) & 0x7FFFFFFF
                out.append((i, suite.make_sample(task, length, sequence_depth(i), s, tokenizer)))
    return out


def _sample_key(task: str, length: int, index: int) -> str:
    return f"{task}/{length}/{index}"


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: that prompt runs again
            break
    return rows


def run_eval(model_dir: str | Path, head_cfg: HeadConfig, *, tasks: list[str], lengths: list[int],
             methods: list[str], settings: list[RazorSetting], n: int, out: Path,
             protocols: Iterable[str] = tuple(PROTOCOLS), seed: int = 0, dtype: str = "float32",
             controls: str = "all", log=None) -> list[dict]:
    """Run the suite, appending rows to `out` (JSONL) prompt by prompt; returns every row in `out`.

    Prompts whose rows are all in `out` already are skipped, so an interrupted run resumes where it
    stopped. A line per prompt reports progress and the ETA.
    """
    from transformers import AutoTokenizer

    from razor_vllm.eval import tasks as suite
    from razor_vllm.eval.hf_razor import continue_greedy, prefill
    from razor_vllm.profile.profiler import load_model

    log = log or sys.stderr  # looked up per call, so a redirected stderr (pytest's capsys) gets it
    protocols = list(protocols)
    bad = set(protocols) - set(PROTOCOLS)
    if bad:
        raise ValueError(f"unknown protocols {sorted(bad)}; choose from {', '.join(PROTOCOLS)}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = sequence_suite(tasks, lengths, n, seed, tok)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    # Rows before the dtype was recorded were all float32 (the only dtype those runs used).
    other = sorted({r.get("dtype", "float32") for r in rows} - {dtype})
    if other:
        raise ValueError(f"{out} holds rows run in {', '.join(other)}; resuming it in {dtype} would pair "
                         f"prompts across dtypes. Pass --dtype {other[0]} or write to another --out")
    if rows:  # a torn last line is dropped for good, so the file stays valid JSONL
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    have: dict[str, set] = {}
    for r in rows:
        have.setdefault(r["sample"], set()).add((r["protocol"], r["label"]))
    # The exact work list first (a prompt's labels depend on its token count), so the progress line's
    # denominator counts the prompts a sweep extends with new settings, not only unseen prompts.
    jobs = []
    for i, sample in samples:
        k = _sample_key(sample.task, sample.length, i)
        ctx, question = suite.build_prompt_ids(sample, tok)
        plan = build_methods(head_cfg, methods, settings, len(ctx) + len(question), seed, controls,
                             label_len=sample.length)
        if not {(p, m.label) for p in protocols for m in plan} <= have.get(k, set()):
            jobs.append((k, sample, ctx, question, plan))
    print(f"{len(jobs)} of {len(samples)} prompts to run ({len(samples) - len(jobs)} complete in {out})",
          file=log, flush=True)
    model = None
    t_start = time.perf_counter()
    for done_now, (k, sample, ctx, question, plan) in enumerate(jobs, 1):
        seq_len = len(ctx) + len(question)
        if model is None:
            model = load_model(model_dir, dtype)
            head_cfg.check_matches(model.config)
            eos = [t for t in {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
                   if isinstance(t, int)]
        t0 = time.perf_counter()
        new = _run_prompt(model, tok, sample, k, ctx, question, plan, protocols, eos, continue_greedy, prefill,
                          suite, done=have.get(k, set()))
        for r in new:
            r["dtype"] = dtype
        with out.open("a") as f:  # one prompt at a time: the resume unit
            for r in new:
                f.write(json.dumps(r) + "\n")
        rows.extend(new)
        el = time.perf_counter() - t_start
        eta = el / done_now * (len(jobs) - done_now)
        print(f"[{done_now}/{len(jobs)}] {k} {seq_len} tok, {len(new)} runs in {time.perf_counter() - t0:.0f}s; "
              f"elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min", file=log, flush=True)
    return rows


def _run_prompt(model, tok, sample, key, ctx, question, plan, protocols, eos, continue_greedy, prefill, suite,
                done: set) -> list[dict]:
    import torch

    rows = []
    seq_len = len(ctx) + len(question)

    def stop(toks):
        # Stopping once every answer is in the output cannot change the verdict (string_match_all
        # only looks for the answers) and saves most of the decode steps.
        return suite.is_correct(sample, tok.decode(toks, skip_special_tokens=True))

    def record(protocol, m: Method, gen, seconds):
        text = tok.decode(gen, skip_special_tokens=True)
        p = m.policy
        rows.append({
            "sample": key, "task": sample.task, "length": sample.length, "depth": sample.depth,
            "seed": sample.seed, "seq_len": seq_len, "protocol": protocol, "method": m.name, "label": m.label,
            "setting": asdict(m.setting) if m.setting else None,
            "sinks": p.sinks if p else None, "window": p.window if p else None,
            "compensation": p.compensation if p else None,
            "kv_fraction": p.kv_fraction(seq_len) if p else 1.0,
            "retrieval_fraction": p.retrieval_fraction if p else 1.0,
            "correct": suite.is_correct(sample, text), "score": suite.score(sample, text), "output": text,
            "seconds": round(seconds, 3)})

    from razor_vllm.eval import batched

    cache, _ = prefill(model, ctx)
    fast = batched.supports(model)

    def run_all(protocol, feed, first):
        todo = [m for m in plan if (protocol, m.label) not in done]
        if not todo:
            return
        if fast:  # every method as one row of a batch over the shared exact prefill
            t = time.perf_counter()
            keys = [layer.keys for layer in cache.layers]
            values = [layer.values for layer in cache.layers]
            gens = batched.decode_rows(model, keys, values, [m.policy for m in todo], feed, sample.max_new_tokens,
                                       eos, first_logits=first, stop=stop)
            per = (time.perf_counter() - t) / len(todo)
            for m, gen in zip(todo, gens):
                record(protocol, m, gen, per)
            return
        for m in todo:
            t = time.perf_counter()
            gen = continue_greedy(model, cache, feed, sample.max_new_tokens, m.policy, eos, first_logits=first,
                                  stop=stop)
            record(protocol, m, gen, time.perf_counter() - t)

    if "question-compressed" in protocols:
        run_all("question-compressed", question, None)
    if "exact-prefill" in protocols:
        with torch.inference_mode():  # the question, exactly, once; every method decodes from here
            first = model(input_ids=torch.tensor([list(question)]), past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[0, -1]
        run_all("exact-prefill", [], first)
    del cache
    return rows


# --------------------------------------------------------------------------------------------------
# Summary: paired statistics
# --------------------------------------------------------------------------------------------------


def paired_bootstrap(a: list[bool], b: list[bool], reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 2.5 %, 97.5 %) with prompts resampled with replacement (paired)."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    boots = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


@dataclass
class SummaryRecord:
    """One line of docs/results/accuracy_summary.json."""

    model: str
    task: str
    """A task name, or "mean" (pooled over the tasks the full model answers >= MIN_FULL_ACCURACY)."""
    length: int
    protocol: str
    method: str
    label: str
    n: int
    accuracy: float
    kv_fraction: float
    delta_vs_full: float | None
    delta_ci95: list[float] | None
    flip_share: float | None
    """Share of prompts whose correctness differs from full's (either direction)."""
    settings: dict = field(default_factory=dict)
    tasks: list[str] | None = None
    """For "mean" records: the tasks pooled."""
    excluded: bool = False
    """True for a task the full model answers below MIN_FULL_ACCURACY (kept out of "mean")."""


def summarize(rows: list[dict], model: str) -> list[SummaryRecord]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["length"], r["protocol"], r["label"]), {})[r["sample"]] = r
    out: list[SummaryRecord] = []
    for (length, protocol, label), cell in sorted(by.items()):
        full = by.get((length, protocol, "full"), {})
        tasks = sorted({r["task"] for r in cell.values()})
        full_acc = {t: _mean([r["correct"] for k, r in full.items() if r["task"] == t]) for t in tasks}
        eligible = [t for t in tasks if full_acc[t] is not None and full_acc[t] >= MIN_FULL_ACCURACY]
        for task in tasks + ["mean"]:
            pooled = eligible if task == "mean" else [task]
            keys = sorted(k for k, r in cell.items() if r["task"] in pooled)
            if not keys:
                continue
            any_row = cell[keys[0]]
            rec = SummaryRecord(
                model=model, task=task, length=length, protocol=protocol, method=any_row["method"], label=label,
                n=len(keys), accuracy=_mean([cell[k]["correct"] for k in keys]),
                kv_fraction=_mean([cell[k]["kv_fraction"] for k in keys]), delta_vs_full=None, delta_ci95=None,
                flip_share=None,
                settings={k: any_row[k] for k in ("sinks", "window", "compensation", "retrieval_fraction")}
                | ({"induction_ratio": any_row["setting"]["induction_ratio"]} if any_row["setting"] else {}),
                tasks=pooled if task == "mean" else None,
                excluded=task != "mean" and task not in eligible)
            paired = [k for k in keys if k in full]
            if label != "full" and paired:
                a = [cell[k]["correct"] for k in paired]
                b = [full[k]["correct"] for k in paired]
                d, lo, hi = paired_bootstrap(a, b)
                rec.delta_vs_full, rec.delta_ci95 = d, [lo, hi]
                rec.flip_share = sum(x != y for x, y in zip(a, b)) / len(a)
            out.append(rec)
    return out


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def format_table(records: list[SummaryRecord], task: str | None = "mean") -> str:
    lines = [f"{'protocol':<20} {'len':>5} {'task':<16} {'method':<34} {'n':>4} {'acc':>6} {'kv':>6}  "
             f"{'delta vs full [95% CI]':<26} {'flips':>5}"]
    for r in sorted(records, key=lambda r: (r.protocol, r.length, r.task, r.label != "full", r.kv_fraction, r.label)):
        if task is not None and r.task != task:
            continue
        delta = (f"{r.delta_vs_full:+.3f} [{r.delta_ci95[0]:+.3f}, {r.delta_ci95[1]:+.3f}]"
                 if r.delta_vs_full is not None else "")
        flips = f"{r.flip_share:.3f}" if r.flip_share is not None else ""
        mark = " (excluded)" if r.excluded else ""
        lines.append(f"{r.protocol:<20} {r.length:>5} {r.task + mark:<16} {r.label:<34} {r.n:>4} {r.accuracy:>6.3f} "
                     f"{r.kv_fraction:>6.3f}  {delta:<26} {flips:>5}")
    return "\n".join(lines)


def pareto(records: list[SummaryRecord]) -> list[SummaryRecord]:
    """The records no other record beats on both KV kept (lower) and accuracy (higher)."""
    front = []
    for r in records:
        if not any(o.kv_fraction <= r.kv_fraction and o.accuracy >= r.accuracy and
                   (o.kv_fraction < r.kv_fraction or o.accuracy > r.accuracy) for o in records):
            front.append(r)
    return sorted(front, key=lambda r: r.kv_fraction)


def plot(records: list[SummaryRecord], path: str | Path) -> None:
    """Mean accuracy (eligible tasks) against KV kept: one panel per (model, length, protocol), each
    (model, length) starting a row of at most 3 panels, razor's Pareto front drawn, controls and
    kvpress peers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r for r in records if r.task == "mean"]
    groups = sorted({(r.model, r.length) for r in means})
    if not groups:
        return
    # a grid, not one row (a summary of several models and lengths stays readable); a group's
    # protocols packed left, wrapped at 3, so rare protocols leave no empty columns elsewhere
    ncols = 3
    slots: list[tuple[int, int, tuple]] = []
    for model, length in groups:
        protocols = sorted({r.protocol for r in means if (r.model, r.length) == (model, length)})
        row0 = (slots[-1][0] + 1) if slots else 0
        slots += [(row0 + k // ncols, k % ncols, (model, protocol, length)) for k, protocol in enumerate(protocols)]
    nrows = slots[-1][0] + 1
    ncols = min(ncols, max(c for _, c, _ in slots) + 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.5 * nrows), squeeze=False)
    used = {(i, j) for i, j, _ in slots}
    for i in range(nrows):
        for j in range(ncols):
            if (i, j) not in used:
                axes[i][j].axis("off")
    style = {"full": ("*", "black"), "razor": ("o", "tab:blue"), "random": ("x", "tab:red"),
             "streaming": ("s", "tab:orange"), "kvpress": ("^", "tab:purple")}
    for i, j, (model, protocol, length) in slots:
        ax = axes[i][j]
        rs = [r for r in means if (r.model, r.protocol, r.length) == (model, protocol, length)]
        for method, (marker, color) in style.items():
            pts = [r for r in rs if r.method.split("-")[0] == method]  # kvpress-<press> rows: "kvpress"
            if pts:
                ax.scatter([r.kv_fraction for r in pts], [r.accuracy for r in pts], marker=marker, c=color,
                           s=40, label=method)
        front = pareto([r for r in rs if r.method == "razor"])
        ax.plot([r.kv_fraction for r in front], [r.accuracy for r in front], c="tab:blue", lw=1)
        for r in front:
            ax.annotate(r.label.replace("razor ", ""), (r.kv_fraction, r.accuracy), fontsize=6,
                        xytext=(3, -8), textcoords="offset points")
        n = rs[0].n if rs else 0
        ax.set_title(f"{model}\n{protocol}, {length} tokens (n={n}, mean over tasks)", fontsize=9)
        ax.set_xlabel("KV kept / full")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(0, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(records: list[SummaryRecord], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
