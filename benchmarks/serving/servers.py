"""The benchmark's servers: a backend spec (`stock`, `razor`, `razor-uniform`, or a variant
NAME=BASE@SRC that runs BASE's settings with razor_vllm imported from the source tree SRC) becomes a
`vllm serve` command line and a `razor_vllm.serve.process.RazorServer` with its own KV space, which
starts, probes, measures the CPU of and stops the process group; this module adds only what the
results record of each server (spec, command, KV GiB, start-up time, the facts its log states, and
where a variant imports razor_vllm from, checked before it starts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serving import REPO
from razor_vllm.serve.process import RazorServer, ServerError, parse_kv_capacity_log, vllm_script

SERVED_NAME = "bench"  # model-neutral: the grid serves SmolLM2 or Qwen2.5 (--model)
BACKENDS = ("stock", "razor", "razor-uniform")

# Module paths a variant's source tree may use, newest first: the package was restructured, and
# before/after runs compare against snapshots taken before that (one list, read by both helpers).
VARIANT_MODULES = {"backend": ("razor_vllm.vllm.backend", "razor_vllm.backend"),
                   "ring_ops": ("razor_vllm.kernels.ring_torch", "razor_vllm.kernels.ring_ops")}
CLI_MODULES = ("razor_vllm.vllm.cli_shim", "razor_vllm.vllm_cli")


def split_backend(name: str) -> tuple[str, str | None]:
    """"NAME=BASE@SRC" (a variant: BASE's settings, razor_vllm imported from source tree SRC, e.g. an
    older snapshot for before/after comparisons in one run) -> (BASE, SRC); plain names -> (name, None)."""
    if "=" not in name:
        return name, None
    base_src = name.split("=", 1)[1]
    base, _, src = base_src.partition("@")
    return base, (src or None)


def _first_module(src: str, candidates: tuple[str, ...]) -> str:
    """The first of `candidates` whose file exists in source tree `src` (top-level `kernels/` of old
    snapshots was installed as razor_vllm.kernels)."""
    for mod in candidates:
        parts = mod.split(".")
        for rel in (Path(*parts), Path(*parts[1:]) if parts[1] == "kernels" else None):
            if rel is not None and (Path(src) / rel).with_suffix(".py").exists():
                return mod
    raise RuntimeError(f"variant {src}: none of {candidates} exists there")


def variant_imports(src: str, env: dict) -> dict:
    """Where a variant's server will import razor_vllm from (same cwd and environment); refuses a
    variant that would silently run the working tree."""
    mods = {name: _first_module(src, cands) for name, cands in VARIANT_MODULES.items()}
    code = (f"import json, importlib; print(json.dumps({{n: importlib.import_module(m).__file__ "
            f"for n, m in {mods!r}.items()}}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    try:
        files = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"variant {src}: cannot import razor_vllm there:\n{res.stderr[-2000:]}") from None
    root = str(Path(src).resolve())
    if not all(str(Path(f).resolve()).startswith(root) or str(Path(f)).startswith(src) for f in files.values()):
        raise RuntimeError(f"variant {src} would import {files}, not its own sources")
    return files


def server_cmd(args, backend: str, port: int) -> list[str]:
    backend, src = split_backend(backend)
    # The working tree runs the `vllm` console script users type; a variant runs `python -m` in its
    # own source tree (cwd), the only way its razor_vllm is imported instead of the installed one.
    launcher = [sys.executable, "-m", _first_module(src, CLI_MODULES)] if src else [str(vllm_script())]
    cmd = [*launcher, "serve", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency)),
           "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if backend != "stock":
        razor = {"head_config": args.head_config, "window": args.window, "sinks": args.sinks,
                 "compensation": args.compensation,
                 "kv_layout": "uniform" if backend == "razor-uniform" else "paged"}
        cmd += ["--attention-backend", "razor", "--additional-config", json.dumps({"razor": razor})]
    return cmd + list(args.server_arg)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def parse_server_log(path: Path) -> dict:
    """What a server's start-up log states: vLLM's KV capacity, the batch token budget, razor's
    layout line and the torch thread count."""
    text = path.read_text(errors="replace")
    out = {}
    if cap := parse_kv_capacity_log(text):
        out.update(kv_cache_tokens=cap["kv_cache_tokens"], max_concurrency=cap["max_concurrency"])
    if m := re.search(r"max_num_batched_tokens=(\d+)", text):
        out["max_num_batched_tokens"] = int(m.group(1))
    if m := re.search(r"(razor KV layout: .*)", text):
        out["layout"] = m.group(1).strip()
    if m := re.search(r"Reducing Torch threads from (\d+) to (\d+)", text):
        out["torch_threads"] = int(m.group(2))
    return out


@dataclass
class BenchServer:
    """One backend of the run: its RazorServer and what the results record of it."""

    backend: str
    """Display name (the part before '=' of a variant)."""
    spec: str
    """As given on the command line (NAME=BASE@SRC for a variant)."""
    kv_space_gib: int
    server: RazorServer
    startup_s: float | None = None
    log_facts: dict = field(default_factory=dict)
    imports: dict | None = None
    """Variants: the files their razor_vllm modules are imported from (checked before start)."""

    @property
    def url(self) -> str:
        return self.server.root_url

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def start(self, timeout: float) -> None:
        """Check a variant's imports, launch, wait for /health, read the facts of the log."""
        _, src = split_backend(self.spec)
        if src:
            self.imports = variant_imports(src, self.server.environment())
        self.server.start()
        try:
            self.server.wait_ready(timeout)
        except ServerError as e:
            raise ServerError(f"{self.backend} server: {e}") from None
        self.startup_s = round(self.server.ready_s, 1)
        self.log_facts = parse_server_log(self.log_path)

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()

    def stop(self) -> None:
        if not self.server.stop():
            print(f"warning: {self.backend} server did not stop cleanly (see {self.log_path})", flush=True)

    def info(self) -> dict:
        """What the results record of this server (checkpoint and final JSON alike)."""
        return {"backend": self.backend, "spec": self.spec, "imports": self.imports, "port": self.server.port,
                "kv_space_gib": self.kv_space_gib, "cmd": self.server.command(), "startup_s": self.startup_s,
                **self.log_facts}


def make_server(args, backend: str, spec: str, port: int, kv_space_gib: int, log_path: Path) -> BenchServer:
    """The server of one backend spec, not started: its own command line (`server_cmd`) and KV space;
    a variant runs from its source tree SRC, with SRC also on PYTHONPATH for vLLM's spawned
    processes (`python -m` puts the cwd first on sys.path, before PYTHONPATH, so SRC's razor_vllm
    shadows the editable install)."""
    _, src = split_backend(spec)
    env = {}
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    srv = RazorServer(args.model, argv=server_cmd(args, spec, port), port=port, host="127.0.0.1",
                      kv_cache_space_gib=kv_space_gib, env=env, cwd=Path(src) if src else REPO,
                      log_path=log_path, startup_timeout=args.ready_timeout)
    return BenchServer(backend, spec, kv_space_gib, srv)
