"""What the HTTP API costs over the Python API: the same txt2img on the bundled tiny model, through
`POST /sdapi/v1/txt2img` of a real `sdtune ui` server (uvicorn on localhost, JSON, base64 PNGs, the job queue)
and through `Generator.generate` in this process, interleaved in one run. The goal (web UI issue): at most 5% more.

    python bench/api_overhead.py [--repeats 15] [--steps 20] [--threads 2]

Reports the median seconds of each and their ratio; the server runs in this process (one worker thread), so both
use the same torch threads and the same loaded model files.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import torch

from prompt_encoding import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import httpx
    import uvicorn

    from sdtune.generate import GenerationParams, Generator
    from sdtune.server.app import Settings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Settings()), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    gen = Generator("tiny")
    prompt = "a red circle on a white background"
    body = {"prompt": prompt, "steps": args.steps, "sampler_name": "DPM++ 2M Karras", "cfg_scale": 7}
    params = GenerationParams(prompt=prompt, steps=args.steps, sampler="DPM++ 2M Karras", cfg_scale=7.0)
    client.post("/sdapi/v1/txt2img", json={**body, "seed": 0}).raise_for_status()  # warm-up: loads the model
    gen.generate(params.replace(seed=0))
    api, direct = [], []
    for r in range(1, args.repeats + 1):
        t = time.perf_counter()
        client.post("/sdapi/v1/txt2img", json={**body, "seed": r}).raise_for_status()
        api.append(time.perf_counter() - t)
        t = time.perf_counter()
        gen.generate(params.replace(seed=r))
        direct.append(time.perf_counter() - t)
    a, d = statistics.median(api), statistics.median(direct)
    print(machine())
    print(f"txt2img, tiny, {args.steps} steps, batch 1, median of {args.repeats}:")
    print(f"  Python API (Generator.generate): {d:.4f} s")
    print(f"  HTTP API (/sdapi/v1/txt2img):    {a:.4f} s")
    print(f"  ratio HTTP / Python: {a / d:.3f} ({(a / d - 1) * 100:+.1f}%)")
    server.should_exit = True


if __name__ == "__main__":
    main()
