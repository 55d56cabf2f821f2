#!/usr/bin/env python
"""Bounded load test of a real `vllm serve --attention-backend razor` on 127.0.0.1.

What it does (defaults sized for the 2-core CPU machine: a few minutes):

* starts a server (razor_vllm.serve.process.RazorServer; `--backend stock` for vLLM's own attention, or
  `--url` to use one that is already running, on loopback only);
* runs `--clients` concurrent streaming clients (asyncio + openai.AsyncOpenAI) over a fixed,
  seeded plan of `--requests` requests, until the plan is done or `--duration` seconds have passed
  (no new request starts after that; the ones in flight finish under `--request-timeout`):
  - *valid*: passkey prompts (razor_vllm.eval.tasks) of mixed lengths (`--lengths`), streamed to the end;
    each must answer its own passkey;
  - *cancelled*: the same kind of prompt, closed after `--cancel-after` streamed chunks (the server
    must abort it and free its KV blocks);
  - *over-long*: a prompt longer than max_model_len; it must be refused with a 4xx whose message
    says so (vLLM: "... maximum context length ...");
* then checks that the server is still healthy and that the KV cache is empty again, from vLLM's
  /metrics: `vllm:kv_cache_usage_perc` == 0 and no running or waiting request. On razor's paged
  layout the retrieval siblings and the ring pages are KV cache groups of the same single block
  pool, so `kv_cache_usage_perc` (1 - free blocks / all blocks of that pool) covers them too;
* prints a table, writes JSON (`--json`), and exits non-zero if any check failed.

vLLM publishes scheduler stats after engine steps only, so an abort that leaves the engine idle
would leave a stale gauge: one short probe request is sent after the load (and before reading the
gauges) to make the engine publish the state after everything else was freed.

Cancelled requests are never checked for an answer. The plan's valid prompts are ones the model
answers with full attention too: re-run with `--backend stock` to compare on the very same plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from razor_vllm.eval import tasks
from razor_vllm.paths import default_model_dir
from razor_vllm.serve.process import RazorServer, http_get, metric_value, parse_metrics

OVERLONG_HINT = "maximum context length"


@dataclass
class Job:
    index: int
    kind: str  # valid | cancel | overlong
    length: int
    depth: float
    seed: int
    # results
    status: str = "not run"  # ok | wrong | cancelled | refused | error | skipped
    ok: bool = False
    prompt_tokens: int | None = None
    chunks: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    answer: str = ""
    expected: list[str] = field(default_factory=list)
    detail: str = ""


def make_plan(args: argparse.Namespace) -> list[Job]:
    """Deterministic mix: every `cancel_every`-th request is cancelled, `overlong` requests are
    spread through the plan; valid requests cycle through `--lengths` from the shortest, cancelled
    ones from the shortest too (a cancelled prompt still costs its whole prefill before its first
    chunk); depths and seeds are drawn from `--seed`."""
    rng = random.Random(args.seed)
    n = args.requests
    overlong_at = set(range(1, n, max(1, n // max(1, args.overlong)))[:args.overlong]) if args.overlong else set()
    lengths = sorted(args.lengths)
    jobs: list[Job] = []
    count = {"valid": 0, "cancel": 0}
    for i in range(n):
        depth, seed = round(rng.uniform(0.1, 0.9), 2), rng.randrange(1 << 30)
        if i in overlong_at:
            jobs.append(Job(i, "overlong", args.max_model_len + 512, depth, seed))
            continue
        kind = "cancel" if args.cancel_every and i % args.cancel_every == args.cancel_every - 1 else "valid"
        jobs.append(Job(i, kind, lengths[count[kind] % len(lengths)], depth, seed))
        count[kind] += 1
    return jobs


async def run_job(client, model: str, job: Job, sample: tasks.Sample, args: argparse.Namespace) -> None:
    import openai

    job.expected = list(sample.answers)
    messages = [{"role": "user", "content": sample.context + "\n\n" + sample.question}]
    t0 = time.monotonic()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=sample.max_new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        parts: list[str] = []
        async for chunk in stream:
            if chunk.usage is not None:
                job.prompt_tokens = chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if job.ttft_s is None:
                    job.ttft_s = time.monotonic() - t0
                job.chunks += 1
                parts.append(chunk.choices[0].delta.content)
                if job.kind == "cancel" and job.chunks >= args.cancel_after:
                    await stream.close()  # drops the connection: vLLM aborts the request
                    break
        job.answer = "".join(parts)
        job.total_s = time.monotonic() - t0
        if job.kind == "cancel":
            job.status, job.ok = "cancelled", job.chunks >= 1
            job.detail = f"closed after {job.chunks} chunks" if job.ok else "stream ended before any chunk"
        elif job.kind == "overlong":
            job.status, job.detail = "error", "an over-long prompt was served instead of refused"
        else:
            job.ok = tasks.is_correct(sample, job.answer)
            job.status = "ok" if job.ok else "wrong"
    except openai.APIStatusError as e:
        job.total_s = time.monotonic() - t0
        msg = str(e)
        if job.kind == "overlong":
            job.ok = 400 <= e.status_code < 500 and OVERLONG_HINT in msg
            job.status = "refused" if job.ok else "error"
        else:
            job.status = "error"
        job.detail = f"HTTP {e.status_code}: {msg[:300]}"
    except Exception as e:  # connection loss, timeout: the server must not do this under load
        job.total_s = time.monotonic() - t0
        job.status, job.detail = "error", f"{type(e).__name__}: {e}"[:300]


PEAK_METRICS = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")


async def sample_peaks(root_url: str, peaks: dict[str, float], done: asyncio.Event) -> None:
    """Poll /metrics once a second during the load and keep the maxima: proof that the KV cache
    and the scheduler were actually busy, so that "empty afterwards" means something."""
    while not done.is_set():
        try:
            status, body = await asyncio.to_thread(http_get, root_url + "/metrics", 5)
            if status == 200:
                samples = parse_metrics(body)
                for name in PEAK_METRICS:
                    value = metric_value(samples, name)
                    if value is not None:
                        peaks[name] = max(peaks.get(name, 0.0), value)
        except OSError:
            pass
        try:
            await asyncio.wait_for(done.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def run_load(root_url: str, model: str, jobs: list[Job], samples: dict[int, tasks.Sample],
                   args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """N workers take jobs from one queue; none starts after the deadline.
    Returns (wall seconds, peak /metrics readings during the load)."""
    import openai

    client = openai.AsyncOpenAI(base_url=root_url + "/v1", api_key="none", timeout=args.request_timeout,
                                max_retries=0)
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    t0 = time.monotonic()
    deadline = t0 + args.duration

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            if time.monotonic() > deadline:
                job.status, job.detail = "skipped", "duration reached before it started"
                continue
            await run_job(client, model, job, samples[job.index], args)
            print(f"  #{job.index:<3} {job.kind:<8} {job.length:>5} tok  {job.status:<9} "
                  f"{job.total_s or 0:6.1f} s  {job.answer.strip()[:50]!r}", flush=True)

    peaks: dict[str, float] = {}
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_peaks(root_url, peaks, done))
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    done.set()
    await sampler
    await client.close()
    return time.monotonic() - t0, peaks


def probe_and_read_metrics(root_url: str, model: str, settle_s: float) -> dict:
    """One short request (flushes scheduler stats), then poll /metrics until the KV cache is empty
    and nothing runs or waits, or `settle_s` passes. Returns the last readings."""
    import openai

    client = openai.OpenAI(base_url=root_url + "/v1", api_key="none", timeout=120, max_retries=0)
    client.completions.create(model=model, prompt="The capital of France is", max_tokens=2, temperature=0)
    deadline = time.monotonic() + settle_s
    while True:
        status, body = http_get(root_url + "/metrics", timeout=10)
        samples = parse_metrics(body) if status == 200 else []
        reading = {
            "kv_cache_usage_perc": metric_value(samples, "vllm:kv_cache_usage_perc"),
            "num_requests_running": metric_value(samples, "vllm:num_requests_running"),
            "num_requests_waiting": metric_value(samples, "vllm:num_requests_waiting"),
            "num_preemptions": metric_value(samples, "vllm:num_preemptions_total"),
            "request_success_total": metric_value(samples, "vllm:request_success_total"),
        }
        drained = (reading["kv_cache_usage_perc"] == 0 and reading["num_requests_running"] == 0
                   and reading["num_requests_waiting"] == 0)
        if drained or time.monotonic() > deadline:
            reading["drained"] = drained
            return reading
        time.sleep(1.0)


def print_table(jobs: list[Job]) -> None:
    print(f"\n{'#':>3} {'kind':<8} {'len':>5} {'depth':>5} {'prompt':>6} {'status':<9} {'TTFT s':>7} "
          f"{'total s':>7}  answer / detail")
    for j in jobs:
        info = j.detail if j.detail and j.kind != "valid" else f"{j.answer.strip()[:40]!r} (want {','.join(j.expected)})"
        print(f"{j.index:>3} {j.kind:<8} {j.length:>5} {j.depth:>5.2f} {j.prompt_tokens or '-':>6} {j.status:<9} "
              f"{j.ttft_s if j.ttft_s is not None else float('nan'):7.1f} {j.total_s or float('nan'):7.1f}  {info[:90]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_dir()), help="HF model directory")
    p.add_argument("--served-model-name", default="smol")
    p.add_argument("--url", help="use this running server (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--backend", choices=["razor", "stock"], default="razor")
    p.add_argument("--head-config", default="smollm2-135m-instruct")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--kv-layout", choices=["paged", "uniform"], default="paged")
    p.add_argument("--clients", type=int, default=6, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=16, help="requests in the plan")
    p.add_argument("--duration", type=float, default=300, help="no request starts after this many seconds")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[500, 1000, 2000, 4000])
    p.add_argument("--cancel-every", type=int, default=4, help="every k-th request is cancelled (0: none)")
    p.add_argument("--cancel-after", type=int, default=2, help="streamed chunks before a cancel")
    p.add_argument("--overlong", type=int, default=2, help="over-long requests in the plan")
    p.add_argument("--max-model-len", type=int, default=4608)
    p.add_argument("--kv-cache-space", type=float, default=1.0, help="GiB (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("out/loadtest.json"))
    p.add_argument("--log", type=Path, default=Path("out/loadtest-serve.log"))
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    jobs = make_plan(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    samples = {j.index: tasks.make_sample("passkey", j.length, j.depth, j.seed, tok) for j in jobs}
    print(f"plan: {len(jobs)} requests ({sum(j.kind == 'valid' for j in jobs)} valid, "
          f"{sum(j.kind == 'cancel' for j in jobs)} cancelled, {sum(j.kind == 'overlong' for j in jobs)} over-long), "
          f"{args.clients} clients, at most {args.duration:.0f} s")

    server = None
    if args.url:
        root = args.url.rstrip("/")
        if not root.startswith(("http://127.", "http://localhost", "http://[::1]")):
            p.error("--url must be a loopback address")
    else:
        razor = None if args.backend == "stock" else {
            "head_config": args.head_config, "window": args.window, "kv_layout": args.kv_layout}
        # A batch budget of several whole prompts: every prompt is prefilled in one chunk, whatever
        # else is in the step (the protocol docs/accuracy.md measured; chunking is tested elsewhere).
        server = RazorServer(args.model, razor=razor, served_model_name=args.served_model_name,
                             max_model_len=args.max_model_len, max_num_batched_tokens=4 * args.max_model_len,
                             kv_cache_space_gib=args.kv_cache_space, log_path=args.log)
        server.start()
        print(f"starting {server.display_command()}\n  log: {args.log}", flush=True)
        server.wait_ready()
        print(f"  ready in {server.ready_s:.0f} s", flush=True)
        root = server.root_url

    result: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    failures: list[str] = []
    try:
        wall, peaks = asyncio.run(run_load(root, args.served_model_name, jobs, samples, args))
        healthy = http_get(root + "/health", timeout=10)[0] == 200
        after = probe_and_read_metrics(root, args.served_model_name, settle_s=30) if healthy else {}
        result.update(wall_s=round(wall, 1), peaks_during_load=peaks, healthy_after=healthy, metrics_after=after)
        if not peaks.get("vllm:kv_cache_usage_perc"):
            failures.append(f"/metrics never showed KV cache usage during the load ({peaks}): the "
                            "empty-afterwards check would prove nothing")
        if not healthy:
            failures.append("server unhealthy after the load")
        elif not after.get("drained"):
            failures.append(f"KV cache not empty / requests left after the load: {after}")
    finally:
        if server is not None:
            clean = server.stop()
            result["clean_shutdown"] = clean
            if not clean:
                failures.append(f"unclean server shutdown (see {args.log})")

    for j in jobs:
        if j.status not in ("skipped",) and not j.ok:
            failures.append(f"request #{j.index} ({j.kind}, {j.length} tokens): {j.status} {j.detail or j.answer!r}")
    run = [j for j in jobs if j.status != "skipped"]
    print_table(jobs)
    print(f"\n{len(run)}/{len(jobs)} requests run in {result.get('wall_s', 0):.0f} s; "
          f"valid correct {sum(j.ok for j in run if j.kind == 'valid')}/{sum(j.kind == 'valid' for j in run)}, "
          f"cancelled {sum(j.ok for j in run if j.kind == 'cancel')}/{sum(j.kind == 'cancel' for j in run)}, "
          f"over-long refused {sum(j.ok for j in run if j.kind == 'overlong')}/{sum(j.kind == 'overlong' for j in run)}; "
          f"healthy after: {result.get('healthy_after')}\npeaks during the load: {result.get('peaks_during_load')}"
          f"\nmetrics after: {result.get('metrics_after')}")
    if not any(j.kind == "valid" for j in run):
        failures.append("no valid request ran (raise --duration)")
    result.update(jobs=[asdict(j) for j in jobs], failures=failures, passed=not failures)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
