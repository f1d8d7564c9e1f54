"""Plain decoding per dtype, interleaved, and where one forward's time goes: is a dtype slower, or the machine noisy?

On the H200 (README "On a GPU") `model.generate()` ran 13-30 tok/s in bf16 against 47-57 in fp32 while single
forwards cost alike (23.6 vs 21.2 ms). This times `model.generate()` (greedy, no drafting) for each dtype in
rounds, order alternating, and profiles one cached one-token forward per dtype (top ops by host time, and by
device time on CUDA).

    python bench/dtype_timing.py --device cuda --rounds 4 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from lookahead.models import default_device, load_model
from lookahead.timing import stopwatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="named model, .gguf or HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    models = {}
    for name in args.dtypes.split(","):
        models[name], tokenizer = load_model(args.model, dtype=name, device=args.device)
    device = torch.device(args.device)
    ids = tokenizer("Write a Python function that checks whether a number is prime.", return_tensors="pt")
    ids = ids.input_ids.to(device)
    new = args.max_new_tokens

    def generate(model) -> None:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    times: dict[str, list[float]] = {name: [] for name in models}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name in (list(models) if rnd % 2 else list(models)[::-1]):
            seconds = stopwatch(lambda m=models[name]: generate(m), device)
            if rnd:
                times[name].append(seconds)
    for name, ts in times.items():
        print(f"{name}: generate {new / statistics.median(ts):.1f} tok/s median "
              f"({', '.join(f'{new / t:.1f}' for t in ts)})")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, model in models.items():
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            step = out.logits[:, -1:].argmax(-1)
            for _ in range(3):  # warm
                model(step, past_key_values=out.past_key_values, use_cache=True)
            with profile(activities=activities) as prof:
                model(step, past_key_values=out.past_key_values, use_cache=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"\n{name}: one cached one-token forward, top ops by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=12))


if __name__ == "__main__":
    main()
