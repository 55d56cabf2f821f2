"""Start, probe and stop a real `vllm serve` subprocess on loopback (the demo, the load test and the
serving tests all use it).

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

`vllm serve` is launched as `python -m razor_vllm.vllm_cli serve ...`: the same as the `vllm` console
script, but it also works on vllm-cpu, whose own script crashes (razor_vllm/vllm_cli.py).
"""

from __future__ import annotations

import json
import os
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

SMOLLM2_DIR = cache_root() / "models" / "smollm2-135m-instruct"
"""Where `razor-vllm fetch-model smollm2-135m-instruct` puts the default model."""


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
    float32 (no AVX512-BF16 here), eager mode (startup ~30 s instead of ~90 s with torch.compile),
    prefix caching off (razor refuses it).
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
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Added to (and overriding) the inherited environment of the subprocess."""
    log_path: Path | None = None
    """Where stdout+stderr go; a temporary file when None."""
    startup_timeout: float = 600.0
    stop_timeout: float = 60.0

    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    ready_s: float | None = field(default=None, init=False)
    """Seconds from launch to the first /health 200."""

    # -- command line ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        args = [sys.executable, "-m", "razor_vllm.vllm_cli", "serve", str(self.model),
                "--host", self.host, "--port", str(self.port), "--served-model-name", self.served_model_name,
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--no-enable-prefix-caching"]
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

        return "vllm " + shlex.join(self.command()[3:])

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
                                         start_new_session=True)
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
