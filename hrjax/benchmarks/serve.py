"""`hrjax serve` under load: real server processes on 127.0.0.1 driven by the `openai` async client
(bounded request loops, chat completions, compile warmed up before each measured run).

1. The specialist world (the reduced main job, trained once into the bench directory and reused, then
   exported): `specialist_requests` at concurrency 32, then `serial_requests` at concurrency 1, cycling
   over distinct held-out questions. `batching_speedup` = requests/s at 32 over requests/s at 1.
2. A one-model bundle of SmolLM2-135M-Instruct (the packaged GGUF loaded at F32 and written with
   `save_hf`; a one-hop router over it trained for two iterations so that `hrjax export` writes the
   bundle): `smollm_requests` at concurrency 32, each exactly `new_tokens` tokens (`ignore_eos`), then the
   same load against llama.cpp's `llama-server --parallel 32 --cont-batching -t 2` on an F32 GGUF of
   the same HF directory (llama.cpp's `convert_hf_to_gguf.py --outtype f32`).
   `tokens_per_s_vs_llama_server` = our generated tokens/s over llama-server's, both as shipped: every
   request has the same prompt, which llama-server's per-slot prompt cache and our prompt cache
   (`--prompt_cache`) then do not prefill again; `tokens_per_s_vs_llama_server_no_prompt_cache` repeats
   both runs with the caches off (our `--prompt_cache=0`, its `cache_prompt: false`): every prompt
   prefilled on both sides.

llama.cpp: the `llama_cpp` argument or $HRJAX_LLAMA_CPP, a llama.cpp source directory holding
`convert_hf_to_gguf.py` and a built `build/bin/llama-server` (e.g. the `vendor/llama.cpp` of the
llama-cpp-python sdist, built with `cmake -DLLAMA_CURL=OFF -DGGML_NATIVE=ON` and
`cmake --build build --target llama-server`); its converter needs the `sentencepiece` module importable.
Without them the llama-server figures are null, with the reason.
The bench directory: $HRJAX_BENCH_DIR or ~/.cache/hrjax/bench, subdirectory `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

from hrjax.benchmarks.common import host_info

CONCURRENCY = 32
STORY_PROMPT = "Write a long story about a robot who learns to paint, with many details."


def bench_dir() -> Path:
    return Path(os.environ.get("HRJAX_BENCH_DIR") or Path.home() / ".cache" / "hrjax" / "bench") / "serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


class Endpoint(NamedTuple):
    url: str  # base URL
    pid: int  # the server's process


def _cpu_seconds(pid: int) -> Optional[float]:
    """CPU seconds (user + system) process `pid` has used, all its threads; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _running(command: list[str], port: int, health_path: str, log: Path):
    """Starts a server `command` listening on 127.0.0.1:`port` -> its `Endpoint`; stopped on exit."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}{health_path}", process, log)
        yield Endpoint(f"http://127.0.0.1:{port}", process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)


async def _load(server: Endpoint, requests: list[dict], concurrency: int) -> dict:
    """Sends `requests` (chat-completion kwargs) with `concurrency` workers -> figures, with the CPU time
    per answered request of the server process and of this client (they share the host's cores)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    server_cpu, client_cpu = _cpu_seconds(server.pid), time.process_time()
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=1800,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=1800)) as client:
        latencies, tokens, errors = [], 0, {"5xx": 0, "4xx": 0, "connection": 0}
        pending = iter(requests)

        async def worker():
            nonlocal tokens
            for kwargs in pending:
                start = time.perf_counter()
                try:
                    response = await client.chat.completions.create(**kwargs)
                except openai.APIStatusError as e:
                    errors["5xx" if e.status_code >= 500 else "4xx"] += 1
                    continue
                except openai.APIConnectionError:
                    errors["connection"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                tokens += response.usage.completion_tokens
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    server_cpu = None if server_cpu is None else _cpu_seconds(server.pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    latencies.sort()

    def per_request(cpu_seconds):
        return round(cpu_seconds * 1e3 / len(latencies), 2) if latencies and cpu_seconds is not None else None

    def quantile(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 1) if latencies else None
    return {"requests": len(requests), "concurrency": concurrency, "ok": len(latencies), "errors_5xx": errors["5xx"],
            "errors_4xx": errors["4xx"], "errors_connection": errors["connection"], "seconds": round(seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 2), "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "server_cpu_ms_per_request": per_request(server_cpu), "client_cpu_ms_per_request": per_request(client_cpu)}


def _serve(bundle: Path, log: Path, *flags: str):
    port = free_port()
    return _running([sys.executable, "-m", "hrjax.cli", "serve", f"--bundle={bundle}", f"--port={port}",
                     "--log_level=warning", *flags], port, "/health", log)


def specialist_bundle(root: Path) -> Path:
    """The reduced specialist world trained (or reused) under `root`, exported to root/bundle."""
    from hrjax.benchmarks.quickstart import main_job_config
    from hrjax.export import export_bundle
    from hrjax.pipeline import evaluate_run

    bundle = root / "bundle"
    if not bundle.exists():
        evaluate_run(main_job_config(root, "reduced"), root / "run", progress=False)
        export_bundle(root / "run", bundle, progress=False)
    return bundle


def smollm_f32_dir(root: Path) -> Path:
    """root/smollm2-135m-f32: the packaged SmolLM2-135M-Instruct GGUF at F32, written by `save_hf` once."""
    from hrjax import assets
    from hrjax.models.gguf import load_gguf
    from hrjax.models.hf import save_hf

    hf_dir = root / "smollm2-135m-f32"
    if not hf_dir.exists():
        save_hf(load_gguf(assets.smollm2_gguf_path(), dtype="float32"), hf_dir)
    return hf_dir


def smollm_bundle(root: Path) -> tuple[Path, Path]:
    """(bundle, the F32 HF directory) of a one-model, one-hop router over SmolLM2-135M-Instruct."""
    from hrjax.config import base_config, run_config
    from hrjax.export import export_bundle
    from hrjax.train import train

    hf_dir, bundle = smollm_f32_dir(root), root / "smollm_bundle"
    if not bundle.exists():
        config = base_config()
        config.pool = [dict(name="smollm2-135m", checkpoint=str(hf_dir), base_rate=1.0)]
        config.task.name = "basic_arithmetic"
        config.task.options = dict(n_train=8, n_validation=4, n_test=4, seed=0)
        config.task.data_dir, config.train.cache_dir = str(root / "data"), str(root / "cache")
        config.env.num_hops, config.env.max_new_tokens, config.env.cost_lambda = 1, 8, 0.0
        config.network.hidden = 16
        config.ppo.num_envs, config.ppo.minibatches = 8, 2
        config.train.num_iterations, config.train.iterations_per_step, config.train.eval_every = 2, 1, 2
        train(run_config(config.to_dict()), root / "smollm_run", progress=False)
        export_bundle(root / "smollm_run", bundle, progress=False)
    return bundle, hf_dir


def llama_cpp_f32(llama_cpp: Optional[str], hf_dir: Path, root: Path) -> tuple[Optional[tuple[Path, Path]], str]:
    """((llama-server binary, an F32 GGUF of `hf_dir` made by llama.cpp's converter under `root`), "") or
    (None, why not)."""
    if not llama_cpp:
        return None, "no llama.cpp: set $HRJAX_LLAMA_CPP to a llama.cpp source dir with build/bin/llama-server"
    source = Path(llama_cpp).expanduser()
    binary, convert = source / "build" / "bin" / "llama-server", source / "convert_hf_to_gguf.py"
    for needed in (binary, convert):
        if not needed.exists():
            return None, f"{needed} is missing (build llama-server: see hrjax/benchmarks/serve.py)"
    gguf = root / f"{hf_dir.name}.gguf"
    if not gguf.exists():
        done = subprocess.run([sys.executable, str(convert), str(hf_dir), "--outtype", "f32", "--outfile", str(gguf)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            return None, f"convert_hf_to_gguf.py failed: {done.stderr[-500:]}"
    return (binary, gguf), ""


def llama_server(binary: Path, gguf: Path, parallel: int, context_per_slot: int, log: Path):
    """`llama-server` on 127.0.0.1 with `parallel` continuous-batching slots, 2 threads -> its `Endpoint` (a
    context manager)."""
    port = free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
               "--cont-batching", "-t", "2", "-tb", "2", "-c", str(parallel * context_per_slot)]
    return _running(command, port, "/health", log)


def llama_server_figures(llama_cpp: Optional[str], hf_dir: Path, root: Path, requests: list[dict],
                         warmup: list[dict]) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
    """llama-server's figures under the same load as shipped (its per-slot prompt cache on: a slot that served
    a prompt skips the prefill of a prompt sharing its prefix), then with `cache_prompt` off (every prompt
    prefilled, as ours are), or (None, None, why not)."""
    found, why_not = llama_cpp_f32(llama_cpp, hf_dir, root)
    if found is None:
        return None, None, why_not
    uncached = [{**r, "extra_body": {**r.get("extra_body", {}), "cache_prompt": False}} for r in requests]
    with llama_server(*found, CONCURRENCY, 256, root / "llama_server.log") as server:
        asyncio.run(_load(server, warmup, CONCURRENCY))
        return (asyncio.run(_load(server, requests, CONCURRENCY)), asyncio.run(_load(server, uncached, CONCURRENCY)),
                None)


def run(specialist_requests: int = 2000, serial_requests: int = 200, smollm_requests: int = 500,
        new_tokens: int = 64, llama_cpp: Optional[str] = None, smollm: bool = True) -> dict:
    from hrjax.tasks.specialist_world import specialist_examples

    root = bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    llama_cpp = llama_cpp or os.environ.get("HRJAX_LLAMA_CPP")
    result: dict = {**host_info(), "cpu_count": os.cpu_count()}

    questions = [e.question for split in ("test", "validation")
                 for e in specialist_examples(split, 300, task_types=("add", "paren"))]

    def chats(n: int, offset: int = 0) -> list[dict]:
        picked = (questions[(offset + i) % len(questions)] for i in range(n))
        return [{"model": "hrjax-router", "messages": [{"role": "user", "content": q}]} for q in picked]
    bundle = specialist_bundle(root)
    with _serve(bundle, root / "server_specialist.log") as server:  # the pool's programs compile on first use:
        asyncio.run(_load(server, chats(specialist_requests, 1000), CONCURRENCY))  # a first pass compiles them
        asyncio.run(_load(server, chats(serial_requests, 1000), 1))
        batched = asyncio.run(_load(server, chats(specialist_requests), CONCURRENCY))
        serial = asyncio.run(_load(server, chats(serial_requests, specialist_requests), 1))
    result.update({"requests": batched["requests"] + serial["requests"],
                   "errors_5xx": batched["errors_5xx"] + serial["errors_5xx"],
                   "p50_ms": batched["p50_ms"], "p99_ms": batched["p99_ms"],
                   "requests_per_s": batched["requests_per_s"],
                   "batching_speedup": round(batched["requests_per_s"] / serial["requests_per_s"], 2),
                   "specialist_c32": batched, "specialist_c1": serial})
    if not smollm:
        result.update(tokens_per_s_vs_llama_server=None, llama_server_note="SmolLM2 run skipped")
        return result

    story = [{"model": "hrjax-router", "messages": [{"role": "user", "content": STORY_PROMPT}],
              "max_tokens": new_tokens, "extra_body": {"ignore_eos": True}} for _ in range(smollm_requests)]
    warmup = story[:5 * CONCURRENCY]  # compiles the admission programs the load's arrivals need
    smollm_path, hf_dir = smollm_bundle(root)
    ours = {}
    for name, flags in (("cached", ()), ("uncached", ("--prompt_cache=0",))):
        with _serve(smollm_path, root / f"server_smollm_{name}.log", *flags) as server:
            asyncio.run(_load(server, warmup, CONCURRENCY))
            ours[name] = asyncio.run(_load(server, story, CONCURRENCY))
    theirs, theirs_uncached, why_not = llama_server_figures(llama_cpp, hf_dir, root, story, warmup)

    def ratio(mine, peer):
        return round(mine["tokens_per_s"] / peer["tokens_per_s"], 3) if peer and peer["tokens_per_s"] else None
    result.update({"smollm_ours": ours["cached"], "smollm_ours_no_prompt_cache": ours["uncached"],
                   "smollm_llama_server": theirs, "smollm_llama_server_no_prompt_cache": theirs_uncached,
                   "requests": result["requests"] + sum(r["requests"] for r in ours.values()),
                   "errors_5xx": result["errors_5xx"] + sum(r["errors_5xx"] for r in ours.values()),
                   "tokens_per_s_vs_llama_server": ratio(ours["cached"], theirs),
                   "tokens_per_s_vs_llama_server_no_prompt_cache": ratio(ours["uncached"], theirs_uncached)})
    if why_not:
        result["llama_server_note"] = why_not
    return result

