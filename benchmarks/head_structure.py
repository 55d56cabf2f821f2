"""Head structure of a profiled model: score distributions, and KV-level selection (the paper's rule:
a KV head takes the max over its GQA group, then the global top 14 % by induction + top 1 % by echo)
against query-level selection (the same ratios over query heads; a KV head is kept whole if any of
its query heads is selected, since a KV head is the unit the cache stores).

    python -m benchmarks.head_structure smollm2-135m-instruct qwen2.5-coder-0.5b-instruct \
        --out docs/results/head_structure.json --plot docs/head_structure.png

Reads the shipped (or given) head configs only; needs configs profiled with per-query-head scores
(`query_*_scores`, written by `razor-vllm profile` since they exist).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from razor_vllm.heads import HeadConfig, load_head_config, select_retrieval_heads


def _quantiles(values: list[float], qs=(0.5, 0.9, 0.99, 1.0)) -> dict[str, float]:
    v = sorted(values)
    return {f"q{int(q * 100)}": v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] for q in qs}


def structure(name: str, cfg: HeadConfig, induction_ratio: float, echo_ratio: float) -> dict:
    m = cfg.model
    if cfg.query_induction_scores is None:
        raise SystemExit(f"{name}: the head config has no per-query-head scores; re-profile it with "
                         f"`razor-vllm profile` (this razor-vllm writes them)")
    g = m.num_attention_heads // m.num_kv_heads
    kv_total = m.num_layers * m.num_kv_heads
    kv_sel = select_retrieval_heads(cfg.induction_scores, cfg.echo_scores, induction_ratio, echo_ratio)
    q_sel = select_retrieval_heads(cfg.query_induction_scores, cfg.query_echo_scores, induction_ratio, echo_ratio)
    kv_set = {(l, h) for l, hs in enumerate(kv_sel) for h in hs}
    q_set = {(l, h) for l, hs in enumerate(q_sel) for h in hs}
    from_q = {(l, h // g) for l, h in q_set}
    # how concentrated a group's induction is: its best query head's score over the group mean
    conc = []
    for l, row in enumerate(cfg.query_induction_scores):
        for kv in range(m.num_kv_heads):
            grp = row[kv * g:(kv + 1) * g]
            mean = sum(grp) / g
            conc.append(max(grp) / mean if mean > 0 else 1.0)
    return {
        "model": name, "architecture": m.architecture, "layers": m.num_layers, "query_heads": m.num_attention_heads,
        "kv_heads": m.num_kv_heads, "group": g, "induction_ratio": induction_ratio, "echo_ratio": echo_ratio,
        "kv_level": {"kv_heads": len(kv_set), "kv_fraction": len(kv_set) / kv_total},
        "query_level": {"query_heads": len(q_set), "query_fraction": len(q_set) / (m.num_layers * m.num_attention_heads),
                        "kv_heads_touched": len(from_q), "kv_fraction": len(from_q) / kv_total},
        "overlap": {"both": len(kv_set & from_q), "kv_level_only": len(kv_set - from_q),
                    "query_level_only": len(from_q - kv_set),
                    "jaccard": len(kv_set & from_q) / max(1, len(kv_set | from_q))},
        "induction_quantiles_query_heads": _quantiles([x for r in cfg.query_induction_scores for x in r]),
        "induction_quantiles_kv_heads": _quantiles([x for r in cfg.induction_scores for x in r]),
        "group_concentration_quantiles": _quantiles(conc),
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | KV heads (G) | KV-level: KV heads kept | query-level: query heads -> KV heads kept | "
             "overlap (Jaccard) | induction q90 / q99 / max (query heads) | best / mean in a group, median / q90 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kvl, ql, ov = r["kv_level"], r["query_level"], r["overlap"]
        iq, cq = r["induction_quantiles_query_heads"], r["group_concentration_quantiles"]
        lines.append(
            f"| {r['model']} | {r['layers']} x {r['kv_heads']} ({r['group']}) | {kvl['kv_heads']} "
            f"({kvl['kv_fraction']:.1%}) | {ql['query_heads']} -> {ql['kv_heads_touched']} ({ql['kv_fraction']:.1%}) | "
            f"{ov['both']} both, {ov['kv_level_only']} / {ov['query_level_only']} only ({ov['jaccard']:.2f}) | "
            f"{iq['q90']:.3f} / {iq['q99']:.3f} / {iq['q100']:.3f} | {cq['q50']:.2f} / {cq['q90']:.2f} |")
    return "\n".join(lines)


def plot(cfgs: dict[str, HeadConfig], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfgs), figsize=(5.5 * len(cfgs), 4), squeeze=False)
    for ax, (name, cfg) in zip(axes[0], cfgs.items()):
        q = sorted((x for r in cfg.query_induction_scores for x in r), reverse=True)
        kv = sorted((x for r in cfg.induction_scores for x in r), reverse=True)
        ax.plot([i / len(q) for i in range(len(q))], q, label=f"query heads ({len(q)})")
        ax.plot([i / len(kv) for i in range(len(kv))], kv, label=f"KV heads, max over group ({len(kv)})")
        ax.axvline(cfg.profile.induction_ratio, color="grey", ls=":", label=f"top {cfg.profile.induction_ratio:.0%}")
        ax.set_yscale("log")
        ax.set_xlabel("rank / number of heads")
        ax.set_ylabel("induction score")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="head configs (shipped names or paths)")
    ap.add_argument("--induction-ratio", type=float, default=None, help="default: each config's own")
    ap.add_argument("--echo-ratio", type=float, default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    cfgs = {Path(c).stem if c.endswith(".json") else c: load_head_config(c) for c in args.configs}
    rows = [structure(n, c, args.induction_ratio if args.induction_ratio is not None else c.profile.induction_ratio,
                      args.echo_ratio if args.echo_ratio is not None else c.profile.echo_ratio)
            for n, c in cfgs.items()]
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot(cfgs, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
