#!/usr/bin/env python3
"""Benchmarks `deepeyes serve` on the embedded TinyEyes, and GRPO steps with remote rollouts.

    scripts/bench_serve.py [--binary target/release/deepeyes] [--threads 2]

1. Chat completions: 1, 8 and 32 concurrent clients, each sending SynthV* items (a 1024x1024 PNG
   as a data URL, temperature 1, a seed per request) one after another; prints requests/s, p50
   and p99 latency, and the mean episodes per batched generate round (from /metrics).
2. GRPO steps of the tiny Qwen2.5-VL fixture (tests/data/tiny-qwen2_5_vl) with rollouts in
   process, on 1 local server and on 2 (non-deterministic, batches split); prints the mean step
   and rollout times. Every process shares this machine's cores, so on a small machine this shows
   the cost of the HTTP path rather than any scaling.

Standard library only; the binary must be built (`cargo build --release -p deepeyes-cli`).
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(binary, bundle, threads, extra=()):
    proc = subprocess.Popen(
        [binary, "serve", "--model", str(bundle), "--port", "0", "--threads", str(threads), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    base = "http://" + line.split("http://")[1].split("/v1")[0]
    return proc, base


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def histogram(base, name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("count", "sum"):
            if line.startswith(f"{name}_{suffix} "):
                values[suffix] = float(line.split()[1])
    return values["count"], values["sum"]


def chat_bench(binary, threads, work):
    out = subprocess.run(
        [binary, "synthv", "--train", "0", "--test", "32", "-q", "--out", str(work / "sv")],
        check=True,
        capture_output=True,
    )
    del out
    items = []
    for line in (work / "sv" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = "Question: " + row["question"] + "\nOptions:" + "".join(
            f"\n{letter}. {option}" for letter, option in zip("ABCD", row["options"])
        )
        png = (work / "sv" / row["image"]).read_bytes()
        items.append((question, "data:image/png;base64," + base64.b64encode(png).decode()))
    proc, base = start_server(binary, ROOT / "assets/tinyeyes", threads, ["--served-model-name", "tinyeyes"])
    try:
        print(f"chat completions, TinyEyes, server --threads {threads}")
        print("| clients | requests | requests/s | p50 latency | p99 latency | episodes per round |")
        print("| --- | --- | --- | --- | --- | --- |")
        for clients, per_client in [(1, 16), (8, 8), (32, 4)]:
            rounds0 = histogram(base, "deepeyes_batch_episodes")
            latencies = []
            lock = threading.Lock()

            def client(c):
                for k in range(per_client):
                    question, url = items[(c * per_client + k) % len(items)]
                    body = {
                        "model": "tinyeyes",
                        "temperature": 1.0,
                        "seed": c * 1000 + k,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "text", "text": question},
                                    {"type": "image_url", "image_url": {"url": url}},
                                ],
                            }
                        ],
                    }
                    t = time.perf_counter()
                    post(base + "/v1/chat/completions", body)
                    with lock:
                        latencies.append(time.perf_counter() - t)

            started = time.perf_counter()
            workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - started
            rounds1 = histogram(base, "deepeyes_batch_episodes")
            per_round = (rounds1[1] - rounds0[1]) / max(rounds1[0] - rounds0[0], 1)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
            print(
                f"| {clients} | {len(latencies)} | {len(latencies) / wall:.1f} | "
                f"{statistics.median(latencies) * 1000:.0f} ms | {p99 * 1000:.0f} ms | {per_round:.1f} |"
            )
    finally:
        proc.kill()


TRAIN = """output-dir = "{out}"
steps = {steps}
[data]
kind = "vstar"
paths = ["{data}"]
[model]
bundle = "{bundle}"
{remote}
[rollout]
max-turns = 2
max-new-tokens = 16
[rollout.sampling]
temperature = 1.0
[batch]
prompts-per-step = 2
mini-batch-prompts = 2
micro-batch = 8
[grpo]
group-size = 8
[checkpoint]
every = 100
"""


def train_bench(binary, threads, work, steps=6):
    bundle = ROOT / "tests/data/tiny-qwen2_5_vl/bundle"
    print(f"\nGRPO steps, tiny Qwen2.5-VL fixture, 2 prompts x 8 samples, {steps} steps, --threads {threads}")
    print("| rollouts | mean step | mean rollout | mean weight sync |")
    print("| --- | --- | --- | --- |")
    for servers in [0, 1, 2]:
        procs = [start_server(binary, bundle, threads, ["--allow-weight-updates"]) for _ in range(servers)]
        try:
            remote = ""
            if servers:
                urls = ", ".join(f'"{base}"' for _, base in procs)
                remote = f'rollout-engine = "remote"\nrollout-servers = [{urls}]'
            out = work / f"train-{servers}"
            config = work / f"train-{servers}.toml"
            config.write_text(
                TRAIN.format(
                    out=out,
                    steps=steps,
                    data=ROOT / "tests/data/datasets/vstar",
                    bundle=bundle,
                    remote=remote,
                )
            )
            subprocess.run(
                [binary, "train", "--config", str(config), "--threads", str(threads), "--no-judge", "-q"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]
            mean = lambda key: statistics.mean(r[key] for r in rows)
            label = "in process" if servers == 0 else f"{servers} server{'s' if servers > 1 else ''}"
            print(
                f"| {label} | {mean('time_step_s') * 1000:.0f} ms | {mean('time_rollout_s') * 1000:.0f} ms | "
                f"{mean('time_weight_sync_s') * 1000:.0f} ms |"
            )
        finally:
            for proc, _ in procs:
                proc.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(ROOT / "target/release/deepeyes"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort/libonnxruntime.so"))
    with tempfile.TemporaryDirectory() as work:
        chat_bench(args.binary, args.threads, Path(work))
        train_bench(args.binary, args.threads, Path(work))


if __name__ == "__main__":
    main()
