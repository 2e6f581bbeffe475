"""Serving benchmark: a real server on 127.0.0.1 and N concurrent streaming clients.

Starts `python -m quillgpt.serve` on a free local port (or uses --url), waits for /ready, warms up,
then for each client count runs that many clients, each sending streaming completions back to back
for --duration seconds. Prints aggregate tokens/s, p50/p99 time to first token, errors and the
server's memory, then one JSON line.

    python benchmarks/serve.py --model shakespeare-char --clients 1,16 --duration 30   # speed-up
    python benchmarks/serve.py --model shakespeare-char --clients 64 --duration 60     # soak

The memory soak at the 226M shape (random weights), int8 weights, 16 clients for 60 s:

    quill init --config configs/harpoon-226m.json --out /tmp/harpoon-226m
    python benchmarks/serve.py --model /tmp/harpoon-226m --weights int8 --clients 16 --duration 60

Targets (Shakespeare model, 2-core CPU): 16 clients >= 4x the single client's tokens/s; a 60 s soak
with 64 clients has zero errors and flat server memory. The server's memory (its resident set, with
any worker processes it started) is sampled every second; "slope" is the least-squares trend over a
run's second half, after the first requests have allocated what they keep (caches, buffers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import cpu_info, describe

REPO = Path(__file__).resolve().parent.parent
MAX_CLIENTS = 256
MAX_DURATION = 600.0


@dataclass
class RunResult:
    clients: int
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    rss_at: list[float] = field(default_factory=list)
    """Seconds into the run of each `rss_mb` sample."""
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "ttft_p50_ms": _ms(percentile(self.ttft, 50)),
            "ttft_p99_ms": _ms(percentile(self.ttft, 99)),
            "latency_p50_ms": _ms(percentile(self.latency, 50)),
            "errors": self.errors,
            "rss_mb_first": round(self.rss_mb[0], 1) if self.rss_mb else None,
            "rss_mb_last": round(self.rss_mb[-1], 1) if self.rss_mb else None,
            "rss_mb_max": round(max(self.rss_mb), 1) if self.rss_mb else None,
            "rss_mb_slope_per_min": _round(rss_slope_mb_per_min(self.rss_at, self.rss_mb), 2),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def rss_slope_mb_per_min(seconds: list[float], mb: list[float]) -> float | None:
    """Least-squares slope of the memory samples in the second half of a run, MB per minute."""
    half = len(mb) // 2
    t, m = seconds[half:], mb[half:]
    if len(t) < 3:
        return None
    t_mean, m_mean = sum(t) / len(t), sum(m) / len(m)
    spread = sum((x - t_mean) ** 2 for x in t)
    return 60 * sum((x - t_mean) * (y - m_mean) for x, y in zip(t, m)) / spread if spread else None


def tree_rss_mb(proc) -> float:
    """Resident memory of a process and the processes it started (`--workers`), in MB."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except Exception:  # a child that just exited
            pass
    return total / 2**20


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(http: httpx.AsyncClient, body: dict, result: RunResult) -> None:
    started = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "error event"))
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None and event["choices"] and event["choices"][0].get("text"):
                    first = time.perf_counter() - started
    except Exception as e:  # counted, and a few kept to show
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(f"{type(e).__name__}: {e}")
        return
    result.requests += 1
    result.tokens += tokens
    result.latency.append(time.perf_counter() - started)
    if first is not None:
        result.ttft.append(first)


async def run_clients(url: str, headers: dict, clients: int, duration: float, body: dict, pid: int | None) -> RunResult:
    result = RunResult(clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(30.0, read=300.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
        deadline = time.perf_counter() + duration

        async def client(i: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                await one_request(http, {**body, "seed": i * 100_003 + n}, result)
                n += 1

        async def sample_memory() -> None:
            if pid is None:
                return
            try:
                import psutil
            except ImportError:
                return
            proc = psutil.Process(pid)
            while time.perf_counter() < deadline:
                result.rss_mb.append(tree_rss_mb(proc))
                result.rss_at.append(time.perf_counter() - (deadline - duration))
                await asyncio.sleep(1.0)

        started = time.perf_counter()
        await asyncio.gather(sample_memory(), *(client(i) for i in range(clients)))
        result.seconds = time.perf_counter() - started  # includes finishing the last requests
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "quillgpt.serve",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--queue-size",
        str(args.queue_size),
        "--log-level",
        "warning",
        *(["--weights", args.weights] if args.weights else []),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, headers: dict, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shakespeare-char", help="bundled model name or model directory")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("QUILL_API_KEY"))
    p.add_argument("--clients", default="1,16", help="comma-separated client counts, one run each")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before the runs")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-batch", type=int, default=16, help="server setting (when this script starts it)")
    p.add_argument("--queue-size", type=int, default=256, help="server setting (when this script starts it)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--weights", default=None, help="server setting: auto (its default), float32, bfloat16, int8")
    args = p.parse_args(argv)
    print(describe(cpu_info()))

    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or any(not 1 <= c <= MAX_CLIENTS for c in counts):
        p.error(f"--clients must be counts between 1 and {MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}] seconds")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    if args.url is None:
        from quillgpt.checkpoint import CheckpointError, resolve_model_path

        try:
            resolve_model_path(args.model)
        except CheckpointError as e:
            print(f"{e}\nPass --model DIR with a model directory (quill train writes one).", file=sys.stderr)
            return 2
        log_path = Path(tempfile.gettempdir()) / f"quill-bench-serve-{os.getpid()}.log"
        proc, url = start_server(args, log_path)
        print(f"server: {url} (pid {proc.pid}, log {log_path})")
    else:
        url = args.url.rstrip("/")
    body = {
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    results = []
    try:
        wait_ready(url, headers, proc)
        model = httpx.get(url + "/v1/models", headers=headers, timeout=5).json()["data"][0]
        body["model"] = model["id"]
        print(
            f"model: {model['id']} ({model.get('parameters', 0):,} parameters), {args.max_tokens} tokens per "
            f"request, prompt {args.prompt!r}, temperature {args.temperature}"
        )
        pid = proc.pid if proc is not None else None
        if args.warmup > 0:
            asyncio.run(run_clients(url, headers, 2, args.warmup, {**body, "max_tokens": 16}, None))
        for clients in counts:
            r = asyncio.run(run_clients(url, headers, clients, args.duration, body, pid))
            s = r.summary()
            results.append(s)
            memory = ""
            if r.rss_mb:
                slope = s["rss_mb_slope_per_min"]
                memory = f", server RSS {s['rss_mb_first']}->{s['rss_mb_last']} MB (max {s['rss_mb_max']}"
                memory += f", second half {slope:+.1f} MB/min)" if slope is not None else ")"
            print(
                f"{clients:4d} clients: {s['tokens_per_s']:8.1f} tokens/s, {s['requests']} requests, "
                f"TTFT p50 {s['ttft_p50_ms']} ms p99 {s['ttft_p99_ms']} ms, errors {s['errors']}{memory}"
            )
            for sample in r.error_samples:
                print(f"      error: {sample}")
    finally:
        if proc is not None:
            stop_server(proc)

    out = {
        "benchmark": "serve",
        "model": body.get("model"),
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch if proc is not None else None,
        "weights": args.weights or "auto",
        **cpu_info(),
        "runs": results,
    }
    single = next((r for r in results if r["clients"] == 1), None)
    if single and single["tokens_per_s"]:
        for r in results:
            r["speedup"] = round(r["tokens_per_s"] / single["tokens_per_s"], 2)
        biggest = max(results, key=lambda r: r["clients"])
        print(f"speed-up at {biggest['clients']} clients: {biggest['speedup']}x the single client")
    print(json.dumps(out))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
