"""The GPU check: every CUDA path of QuillGPT run once, through the project's own commands, in under 8 minutes.

A GPU is lent to this project now and then, for minutes; this script is what runs then. Each part
runs in its own process with its own time limit (the limits add up to less than 8 minutes), so a
crash, an out-of-memory or a hang in one part does not hide the others:

  device             the GPU, its data-sheet bfloat16 peak (on a CPU: its bfloat16 matmul peak, measured)
  eval               `quill eval` of the shipped model on the device equals the CPU float32 figure (1e-3)
  generate           greedy output on the device equals the CPU float32 path's (`quill generate`) on the
                     shipped model, at batch 1 and 16; decode tokens/s at batch 1 and 16 for the
                     Shakespeare shape and the 226M shape (random weights from `quill init`)
  serve              `quill serve --device D` on 127.0.0.1 answers a completion, then shuts down
  torchrun           `torchrun --nproc_per_node=1 -m quillgpt.cli train` (DDP over NCCL; gloo on a CPU)
  resume             `quill train` stopped by SIGTERM, then `--resume`, ends with the same weights as an
                     uninterrupted run (bit for bit on a CPU; within 1e-2 on a GPU, whose atomics reorder sums)
  train-shakespeare  `quill train configs/shakespeare-char.json` for a fixed number of steps: tokens/s, MFU
  train-226m         `quill train configs/harpoon-226m.json` for 100 steps: tokens/s, MFU, peak memory

bfloat16 and torch.compile on a GPU; with `--device cpu --quick` the same parts run at tiny shapes in
float32 without compile (a minute or two on 2 cores), so the script is known to work up to the GPU
itself (tests/test_gpu_check.py). Prints one line per part, then one JSON line. All run outputs go to
a temporary folder (kept with --keep). Datasets come from $QUILL_DATA_DIR (default: ./shared/data or
../shared/data, where they exist).

    scripts/gpu-check.sh                     # on a machine with one CUDA GPU
    scripts/gpu-check.sh --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "shakespeare-char"
SHAKESPEARE = REPO / "configs" / "shakespeare-char.json"
HARPOON_226M = REPO / "configs" / "harpoon-226m.json"
PROMPT = "ROMEO:"

LIMITS_S = {  # part → seconds on a GPU (480 s in all, start-up of each process included)
    "device": 20,
    "eval": 40,
    "generate": 70,
    "serve": 40,
    "torchrun": 45,
    "resume": 60,
    "train-shakespeare": 85,
    "train-226m": 115,
}
QUICK_LIMITS_S = {"device": 20, "eval": 45, "generate": 75, "serve": 60, "torchrun": 45, "resume": 75}
QUICK_LIMITS_S |= {"train-shakespeare": 45, "train-226m": 60}
PARTS = tuple(LIMITS_S)

TINY = ["n_layer=2", "n_embd=64", "n_head=2", "block_size=64", "batch_size=4", "eval_iters=2"]
"""--quick: any config shrunk to a few seconds of CPU."""
TINY_226M = [*TINY, "head_size=32"]
RESUME_TINY = ["n_layer=2", "n_embd=128", "n_head=2", "block_size=64", "batch_size=8", "eval_iters=2"]
"""Big enough that a CPU run lasts seconds, so the interrupt lands mid-run."""


class PartSkipped(Exception):
    """A part that cannot run on this device; its message says why."""


# -- helpers the parts share ------------------------------------------------------------------------------


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def quill(args: list[str], log: Path, timeout: float, env: dict | None = None) -> str:
    """Run `quill ARGS` (as `python -m quillgpt.cli`); its stdout, or an error with the output's tail."""
    done = subprocess.run(
        [sys.executable, "-m", "quillgpt.cli", *args],
        cwd=REPO,
        env=env or os.environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ quill {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"quill {args[0]} exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    return done.stdout


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def steady_tokens_per_s(records: list[dict]) -> float:
    """Tokens/s after the first quarter of the steps: compilation and warm-up left out."""
    first = records[len(records) // 4]
    last = records[-1]
    return (last["tokens"] - first["tokens"]) / max(last["time_s"] - first["time_s"], 1e-9)


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def precision(ctx: argparse.Namespace, compile: bool = True) -> list[str]:
    """bfloat16 (and torch.compile) on a GPU; float32 without compile on a CPU, which may lack bfloat16."""
    if ctx.device.type == "cpu":
        return ["compile=false", "dtype=float32"]
    return [f"compile={str(compile).lower()}", "dtype=bfloat16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the parts: each returns its figures, raises on failure, PartSkipped when it cannot run --------------


def part_device(ctx: argparse.Namespace) -> dict:
    import torch

    from quillgpt.device import cuda_peak_bf16_flops, measure_matmul_peak

    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        peak = cuda_peak_bf16_flops(props.name)
        a = torch.randn(4096, 4096, device=ctx.device, dtype=torch.bfloat16)
        (a @ a).sum().item()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        measured = 20 * 2 * 4096**3 / (time.perf_counter() - start)
        return {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 1e9, 1),
            "peak_bf16_flops": peak,
            "peak_source": "data sheet" if peak else "unknown GPU: no MFU",
            "measured_bf16_matmul_flops": round(measured),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "summary": f"{props.name}: peak bf16 {peak / 1e12 if peak else float('nan'):,.0f} TFLOP/s (data sheet), "
            f"4096² matmul {measured / 1e12:,.0f} TFLOP/s, {props.total_memory / 1e9:.0f} GB",
        }
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    peak = measure_matmul_peak(0.5, n=512, dtype=torch.bfloat16)
    return {
        "name": cpu,
        "peak_bf16_flops": round(peak),
        "peak_source": "measured",
        "torch": torch.__version__,
        "summary": f"{cpu}: bf16 matmul {peak / 1e9:,.0f} GFLOP/s (measured), {torch.get_num_threads()} threads",
    }


def part_eval(ctx: argparse.Namespace) -> dict:
    fraction = ["--val-fraction", "0.005"] if ctx.quick else []
    loss = {}
    for device in (ctx.device_name, "cpu"):
        args = ["eval", str(SHIPPED), "--data", "tinyshakespeare", "--device", device, *fraction, "--json"]
        out = quill(args, ctx.log, ctx.remaining())
        loss[device] = json.loads(out.strip().splitlines()[-1])["val_loss"]
    diff = abs(loss[ctx.device_name] - loss["cpu"])
    if diff > 1e-3:
        raise RuntimeError(f"val loss {loss[ctx.device_name]:.6f} on {ctx.device_name} vs {loss['cpu']:.6f} on cpu")
    return {
        "val_loss": loss[ctx.device_name],
        "cpu_val_loss": loss["cpu"],
        "abs_diff": diff,
        "summary": f"val loss {loss[ctx.device_name]:.5f} on {ctx.device_name}, {loss['cpu']:.5f} on cpu "
        f"(|diff| {diff:.1e} <= 1e-3)",
    }


def part_generate(ctx: argparse.Namespace) -> dict:
    import torch

    from quillgpt.checkpoint import load_model
    from quillgpt.generate import generate
    from quillgpt.sampling import SamplingParams

    # greedy: the device's decoder (batch 1 and 16) against `quill generate` in float32 on the CPU
    n = 32 if ctx.quick else 200
    flags = ["generate", "--model", str(SHIPPED), "--prompt", PROMPT, "--temperature", "0", "--no-stream"]
    flags += ["--max-new-tokens", str(n), "--weights", "float32"]
    reference = quill([*flags, "--device", "cpu"], ctx.log, ctx.remaining()).removesuffix("\n")
    on_device = reference  # on a CPU the same command; on a GPU, the GPU's
    if ctx.device.type != "cpu":
        on_device = quill([*flags, "--device", ctx.device_name], ctx.log, ctx.remaining()).removesuffix("\n")
    loaded = load_model(SHIPPED, device=ctx.device)
    greedy = SamplingParams(max_new_tokens=n, temperature=0.0)
    batched = generate(loaded.model, loaded.tokenizer, [PROMPT] * 16, greedy, max_batch=16)
    rows_equal = sum(PROMPT + c.text == reference for c in batched)
    if on_device != reference or rows_equal != 16:
        raise RuntimeError(
            f"greedy output differs from the CPU float32 path: batch 1 "
            f"{'equal' if on_device == reference else 'differs'}, batch 16 {rows_equal}/16 rows equal "
            f"(first: {(PROMPT + batched[0].text)[:80]!r} vs {reference[:80]!r})"
        )

    # speed: decode tokens/s at batch 1 and 16, for both shapes
    m226 = ctx.tmp / "harpoon-226m-random"
    quill(
        ["init", "--config", str(HARPOON_226M), "--out", str(m226), *sets(TINY_226M if ctx.quick else [])], ctx.log, 90
    )
    new_tokens = 16 if ctx.quick else 100
    rates = {}
    for shape, path in (("shakespeare", SHIPPED), ("226m", m226)):
        loaded = load_model(path, device=ctx.device, weights="auto")
        for batch in (1, 16):
            prompts = [PROMPT] * batch
            generate(loaded.model, loaded.tokenizer, prompts, SamplingParams(max_new_tokens=4))  # warm-up
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=0)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            done = generate(loaded.model, loaded.tokenizer, prompts, params, max_batch=batch)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            rates[f"{shape}_b{batch}_tokens_per_s"] = sum(len(c.tokens) - c.prompt_tokens for c in done) / (
                time.perf_counter() - start
            )
        del loaded
    shown = ", ".join(f"{k.removesuffix('_tokens_per_s')} {v:,.0f}" for k, v in rates.items())
    return {
        **{k: round(v, 1) for k, v in rates.items()},
        "greedy_tokens": n,
        "greedy_equal_b1": True,
        "greedy_equal_b16_rows": rows_equal,
        "summary": f"greedy = CPU float32 at batch 1 and 16 ({n} tokens); tokens/s: {shown}",
    }


def part_serve(ctx: argparse.Namespace) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(SHIPPED), "--device", ctx.device_name, "--host", "127.0.0.1", "--port", str(port)]
    log = open(ctx.log, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "quillgpt.cli", *args, "--log-level", "warning"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + ctx.remaining() - 5
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"quill serve exited {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("quill serve was not ready in time")
            time.sleep(0.25)
        started = time.perf_counter()
        body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        seconds = time.perf_counter() - started
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        text = r.json()["choices"][0]["text"]
        if not text:
            raise RuntimeError("an empty completion")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {
        "completion": text,
        "seconds": round(seconds, 3),
        "exit_code": proc.returncode,
        "summary": f"32 tokens in {seconds * 1000:,.0f} ms on {url}: {text[:40]!r}",
    }


def part_torchrun(ctx: argparse.Namespace) -> dict:
    out = ctx.tmp / "torchrun"
    overrides = ["max_iters=5", "eval_interval=5", "eval_iters=2", "final_eval=false", *precision(ctx, compile=False)]
    overrides += TINY if ctx.quick else []
    env = {**os.environ, "NCCL_DEBUG": "INFO"} if ctx.device.type == "cuda" else None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "quillgpt.cli", "train", str(SHAKESPEARE), "--out", str(out), "--set", f"device={ctx.device_name}"]
    done = subprocess.run([*cmd, *sets(overrides)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=ctx.remaining())  # fmt: skip
    ctx.log.write_text(done.stdout + done.stderr)
    if done.returncode != 0 or "done: 5 steps" not in done.stdout:
        raise RuntimeError(f"torchrun exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if backend == "nccl" and "NCCL INFO" not in done.stdout + done.stderr:
        raise RuntimeError("the run finished but NCCL never started (no NCCL INFO lines)")
    return {"backend": backend, "steps": 5, "summary": f"5 steps, one process, DDP over {backend}"}


def part_resume(ctx: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    steps = 200 if ctx.quick else 300
    overrides = [f"max_iters={steps}", f"eval_interval={steps}", "final_eval=false", *precision(ctx, compile=False)]
    overrides += RESUME_TINY if ctx.quick else []
    overrides += [f"device={ctx.device_name}"]
    whole, split = ctx.tmp / "resume-whole", ctx.tmp / "resume-split"
    quill(["train", str(SHAKESPEARE), "--out", str(whole), *sets(overrides)], ctx.log, ctx.remaining())

    cmd = [sys.executable, "-m", "quillgpt.cli", "train", str(SHAKESPEARE), "--out", str(split), *sets(overrides)]
    with open(ctx.log, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while not (split / "metrics.jsonl").exists() and proc.poll() is None:  # the steps are about to start
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=ctx.remaining())
    if code != 130:
        raise RuntimeError(f"the interrupted run exited {code}, not 130 (interrupted; finished before the signal?)")
    stopped_at = json.loads((split / "last" / "config.json").read_text())["provenance"]["steps"]
    quill(["train", str(SHAKESPEARE), "--out", str(split), "--resume", *sets(overrides)], ctx.log, ctx.remaining())

    a, b = (load_file(d / "last" / "model.safetensors") for d in (whole, split))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    losses = [step_records(d)[-1]["loss"] for d in (whole, split)]
    tolerance = 0.0 if ctx.device.type == "cpu" else 1e-2
    if a.keys() != b.keys() or diff > tolerance or not math.isclose(*losses, abs_tol=max(tolerance, 1e-12)):
        raise RuntimeError(f"resumed run differs: max |dw| {diff:.2e}, last losses {losses[0]} vs {losses[1]}")
    return {
        "steps": steps,
        "stopped_at": stopped_at,
        "bitwise": bitwise,
        "max_abs_weight_diff": diff,
        "summary": f"stopped at step {stopped_at} of {steps}, resumed: "
        + ("bit-identical weights" if bitwise else f"max |dw| {diff:.1e} (tolerance {tolerance:g})"),
    }


def train_part(ctx: argparse.Namespace, config: Path, steps: int, tiny: list[str], extra: list[str]) -> dict:
    """`quill train CONFIG` for `steps` steps in this process (so its peak memory can be read)."""
    from quillgpt.checkpoint import load_model
    from quillgpt.cli import main
    from quillgpt.config import load_train_config
    from quillgpt.device import peak_matmul_flops

    out = ctx.tmp / config.stem
    overrides = [f"max_iters={steps}", f"eval_interval={steps}", f"device={ctx.device_name}", *precision(ctx), *extra]
    overrides += tiny if ctx.quick else []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", str(config), "--out", str(out), *sets(overrides)])
    line = printed.getvalue().strip().splitlines()[-1] if printed.getvalue().strip() else ""
    ctx.log.write_text(printed.getvalue())
    if code != 0:
        raise RuntimeError(f"quill train exited {code}: {line}")
    records = step_records(out)
    if len(records) != steps or not all(math.isfinite(r["loss"]) for r in records):
        raise RuntimeError(f"{len(records)} steps logged of {steps}, or a loss that is not finite")
    cfg = load_train_config(config, overrides)
    rate = steady_tokens_per_s(records)
    model = load_model(out).model
    peak = peak_matmul_flops(ctx.device, cfg.dtype)
    flops = model.config.flops_per_token(model.num_params(non_embedding=True))
    mfu = flops * rate / peak if peak else None
    memory = peak_memory_gb(ctx.device)
    reported = re.search(r"MFU ([\d.]+)%", line)
    mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
    return {
        "steps": steps,
        "parameters": model.num_params(),
        "tokens_per_s": round(rate),
        "mfu": mfu,
        "mfu_whole_run_reported": float(reported.group(1)) / 100 if reported else None,
        "peak_memory_gb": round(memory, 2),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "dtype": cfg.dtype,
        "compile": cfg.compile,
        "train_line": line,
        "summary": f"{steps} steps of {model.num_params() / 1e6:.1f}M ({cfg.dtype}, compile {cfg.compile}): "
        f"{rate:,.0f} tokens/s after warm-up, MFU {mfu_text}, peak memory {memory:.2f} GB, "
        f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}",
    }


def part_train_shakespeare(ctx: argparse.Namespace) -> dict:
    return train_part(ctx, SHAKESPEARE, 8 if ctx.quick else 200, TINY, ["eval_iters=10"])


def part_train_226m(ctx: argparse.Namespace) -> dict:
    extra = ["eval_iters=5", *(["final_eval=false"] if ctx.quick else [])]
    return train_part(ctx, HARPOON_226M, 6 if ctx.quick else 100, TINY_226M, extra)


RUNNERS = {
    "device": part_device,
    "eval": part_eval,
    "generate": part_generate,
    "serve": part_serve,
    "torchrun": part_torchrun,
    "resume": part_resume,
    "train-shakespeare": part_train_shakespeare,
    "train-226m": part_train_226m,
}


# -- one part in its own process; the driver ---------------------------------------------------------------


def run_part(args: argparse.Namespace) -> int:
    """Worker: run one part, then print its result as the last line (JSON)."""
    started = time.monotonic()
    ctx = argparse.Namespace(quick=args.quick, device_name=args.device, tmp=Path(args.tmp))
    ctx.log = ctx.tmp / f"{args.part}.log"
    ctx.remaining = lambda: max(1.0, args.limit - (time.monotonic() - started))
    try:
        import torch

        from quillgpt.device import resolve_device

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise PartSkipped("CUDA is not available here")
        ctx.device = resolve_device(args.device)
        result = {"status": "pass", **RUNNERS[args.part](ctx)}
    except PartSkipped as e:
        result = {"status": "skip", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "fail", "reason": f"{type(e).__name__}: {e}"[:600]}
    print(json.dumps(result, default=str), flush=True)
    return 0


def drive(part: str, args: argparse.Namespace, tmp: Path, limit: float, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--part", part, "--device", args.device, "--tmp", str(tmp), "--limit", str(limit)]
    started = time.monotonic()
    with open(tmp / f"{part}.out", "w+", encoding="utf-8") as out:
        proc = subprocess.Popen([*cmd, *(["--quick"] if args.quick else [])], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
            proc.wait()
            return {"status": "fail", "reason": f"over its time limit of {limit:.0f} s", "seconds": round(limit, 1)}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # a server or trainer it left behind
        out.seek(0)
        text = out.read()
    seconds = round(time.monotonic() - started, 1)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        return {**json.loads(last), "seconds": seconds}
    except json.JSONDecodeError:
        return {"status": "fail", "reason": f"exited {proc.returncode}: {text[-400:]}", "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, float32, no compile: the CPU rehearsal")
    p.add_argument("--only", default=None, help=f"comma-separated parts (default all: {','.join(PARTS)})")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of run outputs and logs")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args)

    parts = args.only.split(",") if args.only else list(PARTS)
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    limits = QUICK_LIMITS_S if args.quick else LIMITS_S
    tmp = Path(tempfile.mkdtemp(prefix="quill-gpu-check-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["QUILL_CACHE_DIR"] = str(tmp / "cache")  # tokenised data and the like: nothing outside tmp
    if "QUILL_DATA_DIR" not in env:
        env["QUILL_DATA_DIR"] = next(
            (str(d) for d in (REPO / "shared/data", REPO.parent / "shared/data") if d.is_dir()), ""
        )
    print(f"gpu check: device {args.device}{' (quick)' if args.quick else ''}, outputs in {tmp}", flush=True)
    started = time.monotonic()
    results = {}
    for part in parts:
        r = drive(part, args, tmp, limits[part], env)
        results[part] = r
        detail = r.get("summary") or r.get("reason", "")
        print(f"{part:18} {r['status']:4} {r['seconds']:6.1f} s  {detail}", flush=True)
    total = time.monotonic() - started
    failed = [k for k, r in results.items() if r["status"] == "fail"]
    print(f"{len(parts) - len(failed)}/{len(parts)} parts passed or skipped, {total:.0f} s in all")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"check": "gpu", "device": args.device, "quick": args.quick, "seconds": round(total, 1), "parts": results}
    print(json.dumps(report, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
