"""Load test: throughput and latency of `lookahead serve` with adaptive drafting vs none, interleaved.

    python -m lookahead.server.loadtest [--concurrency 1 4 8 16] [--modes adaptive plain fixed]
                                        [--workload mix|copy] [--max-tokens 96] [--out docs/server_load]

Starts one server per mode from the CLI on loopback ports, same model, dtype, kernels and threads (one
after another: the first measures `--dtype auto` alone, the others are given its choice):
`adaptive` (the default server: tree size from the measured cost curve and the batch size),
`plain` (`--no-draft`) and `fixed` (the full `max_nodes` tree per row at every batch size: what
drafting costs under load without adaptation). For each concurrency c, every mode gets the same
fresh prompts (a disjoint slice per c, so no server's shared trie has seen an answer it is
measured on), from c closed-loop streaming clients, in `rounds` rounds whose mode order rotates,
so that drift in machine load hits every mode alike. Reports output tokens/s, median and p95
request latency, time to first token, and from each server's /metrics the mean draft nodes
per row, tokens per row-step and mean batch in that cell. Writes JSON, a markdown table and a PNG.

Workloads: `mix` = the benchmark's test prompts (MT-Bench, HumanEval, ShareGPT interleaved);
`copy` = generated copy-heavy tasks (rewrite a list as a table, logs to JSON lines, ...), where
answers quote their prompts, as in RAG traffic.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {"adaptive": [], "plain": ["--no-draft"],
         "fixed": ["--sizing", "fixed"]}


def start_server(port: int, mode: str, args: argparse.Namespace, numerics: dict | None = None) -> subprocess.Popen:
    """`numerics`: another server's dtype and kernels, given explicitly so both servers run the same ones."""
    dtype = ["--dtype", numerics["dtype"], "--kernels", numerics["kernels"]] if numerics else ["--dtype", args.dtype]
    cmd = [sys.executable, "-m", "lookahead.cli", "serve", "--port", str(port), *dtype,
           "--threads", str(args.threads), "--served-model-name", MODEL, "--log-level", "warning",
           "--max-batch", str(max(args.concurrency)), *MODES[mode]]
    if args.model:
        cmd += ["--model", args.model]
    log = open(Path(tempfile.gettempdir()) / f"lookahead-loadtest-{mode}-{port}.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} did not start")


def metrics(port: int) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()[:2]
            out[name] = float(value)
    return out


def load_prompt_messages(n: int) -> list[list[dict]]:
    """`n` distinct chat prompts: the benchmark's test split (chat, code, qa interleaved), or a fallback."""
    try:
        from ..benchmark.datasets import load_prompts
        pools = [load_prompts(c, split="test", max_prompt_chars=1500) for c in ("chat", "code", "qa")]
        mixed = [p.messages for group in zip(*pools, strict=False) for p in group]
        if len(mixed) >= n:
            return mixed[:n]
    except Exception as e:  # benchmark data not installed
        print(f"loadtest: benchmark prompts unavailable ({e}); using generated prompts", file=sys.stderr)
    topics = ["a lighthouse", "tea", "volcanoes", "a chess club", "rain", "bridges", "owls", "trains", "salt",
              "maps", "bees", "glass", "winter", "ports", "clocks", "paper"]
    return [[{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]} "
                                         f"(variant {i})."}] for i in range(n)]


def copy_prompts(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` distinct copy-heavy tasks over generated records (names, cities, numbers, log lines)."""
    import random
    rng = random.Random(seed)
    first = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
             "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
    last = ["Martin", "Costa", "Wei", "Novak", "Obi", "Zahra", "Ilic", "Sato", "Petrov", "Silva", "Mensah", "Berg"]
    roles = ["data engineer", "product manager", "designer", "backend developer", "nurse", "teacher", "chemist",
             "pilot", "accountant", "site reliability engineer"]
    cities = ["Lyon", "Porto", "Shenzhen", "Prague", "Lagos", "Casablanca", "Osaka", "Quito", "Oslo", "Pune", "Accra"]
    levels = ["INFO", "WARN", "ERROR", "DEBUG"]
    events = ["cache miss", "request served", "retrying upstream", "timeout talking to db", "worker restarted",
              "config reloaded", "disk usage high", "user logged in"]
    out = []
    for i in range(n):
        k = rng.randint(5, 8)
        people = [f"{rng.choice(first)} {rng.choice(last)}, {rng.choice(roles)}, {rng.choice(cities)}"
                  for _ in range(k)]
        logs = [f"2026-11-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d} {rng.choice(levels)} {rng.choice(events)} ({rng.randint(1, 999)} ms)"
                for _ in range(k)]
        tasks = [
            "Rewrite this list as a markdown table with columns Name, Role and City:\n" + "\n".join(
                f"- {p}" for p in people),
            "Convert these log lines to JSON lines with fields date, time, level and message:\n" + "\n".join(logs),
            "Repeat the following list exactly, then sort it by city:\n" + "\n".join(people),
            "Which of these log lines are warnings or errors? Quote them exactly.\n" + "\n".join(logs),
        ]
        out.append([{"role": "user", "content": tasks[i % len(tasks)]}])
    return out


@dataclass
class Cell:
    concurrency: int
    mode: str
    requests: int
    tokens: int
    wall_s: float
    tok_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    draft_nodes_per_row: float | None = None
    accepted_per_row_step: float | None = None
    mean_batch: float | None = None
    forward_ms_per_step: float | None = None   # batched verify forward
    other_ms_per_step: float | None = None     # drafting, accept, stop checks, streaming (decode thread)
    prefill_s: float | None = None
    policy: dict | None = None         # the drafting server's policy after the cell (/health)


async def one_request(http: httpx.AsyncClient, messages: list[dict], max_tokens: int, chat: bool = True
                      ) -> tuple[float, float, int]:
    """One streamed request: (latency, time to first token, completion tokens). `chat=False`: a model without a chat
    template (a base model) gets the turns' text as a plain prompt on /v1/completions."""
    if chat:
        path, body = "/v1/chat/completions", {"messages": messages}
    else:
        path, body = "/v1/completions", {"prompt": "\n\n".join(m["content"] for m in messages)}
    body.update(model=MODEL, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", path, json=body) as r:
        if r.is_error:  # say what the server said, not only its status
            await r.aread()
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"]:
                choice = chunk["choices"][0]
                if choice["delta"].get("content") if chat else choice.get("text"):
                    first = time.perf_counter() - t0
    return time.perf_counter() - t0, first if first is not None else time.perf_counter() - t0, tokens


async def run_cell(port: int, prompts: list[list[dict]], concurrency: int, max_tokens: int, chat: bool = True
                   ) -> tuple[float, list[tuple[float, float, int]]]:
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[tuple[float, float, int]] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(http, queue.get_nowait(), max_tokens, chat))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - t0, results


class Tally:
    """One mode's results at one concurrency, summed over its rounds."""

    def __init__(self, port: int, chat: bool = True) -> None:
        self.port, self.chat = port, chat
        self.wall = 0.0
        self.results: list[tuple[float, float, int]] = []
        self.deltas: dict[str, float] = {}

    def round(self, prompts: list, concurrency: int, max_tokens: int) -> None:
        before = metrics(self.port)
        wall, results = asyncio.run(run_cell(self.port, prompts, concurrency, max_tokens, self.chat))
        after = metrics(self.port)
        self.wall += wall
        self.results += results
        for k in after:
            self.deltas[k] = self.deltas.get(k, 0.0) + after[k] - before.get(k, 0.0)

    def cell(self, concurrency: int, mode: str) -> Cell:
        latencies = sorted(r[0] for r in self.results)
        tokens = sum(r[2] for r in self.results)
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        cell = Cell(concurrency, mode, len(self.results), tokens, self.wall, tokens / self.wall,
                    statistics.median(latencies), p95, statistics.median(r[1] for r in self.results))
        d = self.deltas
        row_steps = d.get("lookahead_row_steps_total", 0.0)
        if row_steps:
            cell.draft_nodes_per_row = d["lookahead_draft_tokens_total"] / row_steps
            cell.accepted_per_row_step = d["lookahead_generated_tokens_total"] / row_steps
            steps = max(d["lookahead_decode_steps_total"], 1)
            cell.mean_batch = row_steps / steps
            cell.forward_ms_per_step = 1000 * d.get("lookahead_forward_seconds_total", 0.0) / steps
            cell.other_ms_per_step = 1000 * d.get("lookahead_draft_seconds_total", 0.0) / steps
            cell.prefill_s = d.get("lookahead_prefill_seconds_total")
        if mode == "adaptive":
            cell.policy = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json().get("draft_policy")
        return cell


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(cells: list[Cell]) -> str:
    lines = ["| concurrency | drafting | output tok/s | vs plain | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | "
             "draft nodes/row | tokens/row-step | mean batch | ms/step (forward + other) |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    plain = {c.concurrency: c for c in cells if c.mode == "plain"}
    order = {"adaptive": 0, "fixed": 1, "plain": 2}
    for c in sorted(cells, key=lambda c: (c.concurrency, order.get(c.mode, 3))):
        base = plain.get(c.concurrency)
        speed = f"{c.tok_per_s / base.tok_per_s:.2f}x" if base and c.mode != "plain" else "-"
        lines.append(f"| {c.concurrency} | {c.mode} | {c.tok_per_s:.1f} | {speed} | {c.latency_p50_s:.1f} | "
                     f"{c.latency_p95_s:.1f} | {c.ttft_p50_s:.2f} | {fmt(c.draft_nodes_per_row)} | "
                     f"{fmt(c.accepted_per_row_step)} | {fmt(c.mean_batch)} | "
                     f"{c.forward_ms_per_step or 0:.0f} + {c.other_ms_per_step or 0:.0f} |")
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"adaptive": ("o-", "lookahead, adaptive tree"),
              "fixed": ("^:", "lookahead, full tree at every batch size"), "plain": ("s--", "no draft")}
    for mode, (style, label) in styles.items():
        cs = sorted((c for c in cells if c.mode == mode), key=lambda c: c.concurrency)
        if not cs:
            continue
        xs = [c.concurrency for c in cs]
        line, = a.plot(xs, [c.tok_per_s for c in cs], style, label=label)
        b.plot(xs, [c.latency_p50_s for c in cs], style, color=line.get_color(), label=f"{label}, p50")
        b.plot(xs, [c.latency_p95_s for c in cs], style, color=line.get_color(), alpha=0.4, label=f"{label}, p95")
        if mode == "adaptive":
            for c in cs:
                a.annotate(f"{c.draft_nodes_per_row or 0:.1f} nodes/row", (c.concurrency, c.tok_per_s),
                           textcoords="offset points", xytext=(4, 6), fontsize=8)
    for ax, ylabel in ((a, "output tokens/s"), (b, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lookahead.server.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto", help="as `lookahead serve --dtype` (auto: measured choice)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["adaptive", "plain", "fixed"], choices=sorted(MODES))
    parser.add_argument("--workload", default="mix", choices=["mix", "copy"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency, mode order rotating")
    parser.add_argument("--requests", type=int, default=None, help="requests per round (default: max(2, c))")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="docs/server_load", help="path prefix for .json, .md, .png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_round = {c: args.requests or max(2, c) for c in args.concurrency}
    total = sum(per_round.values()) * args.rounds + 2
    prompts = copy_prompts(total) if args.workload == "copy" else load_prompt_messages(total)
    ports = {mode: free_port() for mode in args.modes}
    procs: dict[str, subprocess.Popen] = {}
    cells: list[Cell] = []
    numerics: dict[str, dict] = {}  # per mode: the dtype and kernels its server runs (`auto` decides there)
    chat = True  # the servers' model has a chat template (else prompts go to /v1/completions as text)
    t_start = time.time()
    try:
        # `auto` is decided by the first server alone, then given to the others: where two candidates measure
        # within noise (bf16 eager and packed at one thread: ~99 vs ~92 tok/s in one start, ~65 vs ~92 in
        # another), servers deciding apart could run different kernels, and the ratio would not be drafting's.
        for mode, port in ports.items():
            procs[mode] = start_server(port, mode, args, next(iter(numerics.values()), None))
            wait_healthy(port, procs[mode])
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
            numerics[mode] = health.get("numerics")
            chat = health.get("chat_template", True)
            asyncio.run(run_cell(port, prompts[-2:], 1, 8, chat))  # warm-up (first forwards), not reported
        if not chat:
            print("loadtest: the model has no chat template: each prompt's text goes to /v1/completions", flush=True)
        start = 0
        modes = list(args.modes)
        for c in args.concurrency:
            tallies = {mode: Tally(ports[mode], chat) for mode in modes}
            for r in range(args.rounds):
                batch = prompts[start: start + per_round[c]]
                start += per_round[c]
                for mode in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotate the order
                    tallies[mode].round(batch, c, args.max_tokens)
            for mode in args.modes:
                cell = tallies[mode].cell(c, mode)
                cells.append(cell)
                print(f"c={c:>2} {mode:>8} {cell.tok_per_s:7.1f} tok/s  p50 {cell.latency_p50_s:6.1f}s  "
                      f"p95 {cell.latency_p95_s:6.1f}s  nodes/row {cell.draft_nodes_per_row or 0:.2f}  "
                      f"tokens/row-step {cell.accepted_per_row_step or 0:.2f}", flush=True)
            modes = modes[1:] + modes[:1]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    import torch

    from ..decoding.cost import cpu_info
    cpu, flags = cpu_info()
    ran = sorted({f"{n['dtype']} {n['kernels']}" for n in numerics.values() if n})
    meta = {"model": args.model or MODEL, "dtype": args.dtype, "servers": numerics, "threads": args.threads,
            "max_tokens": args.max_tokens,
            "workload": args.workload, "endpoint": "chat/completions" if chat else "completions",
            "rounds": args.rounds, "requests_per_round": per_round,
            "cpu_model": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "minutes": round((time.time() - t_start) / 60, 1),
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=1))
    md = table(cells)
    out.with_suffix(".md").write_text(md + "\n")
    dtype = f"{args.dtype} ({', '.join(ran)})" if args.dtype == "auto" and ran else args.dtype
    plot(cells, out.with_suffix(".png"), f"{meta['model']} {dtype} on {os.cpu_count()} shared CPU cores, "
                                         f"{args.threads} thread(s), '{args.workload}' prompts, max_tokens "
                                         f"{args.max_tokens}, streaming")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
