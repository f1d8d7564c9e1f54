"""Command line: `lookahead generate` (more subcommands join as they are built)."""
from __future__ import annotations

import argparse
import sys

from .benchmark.cli import add_parser as add_bench_command
from .export import add_parser as add_export_command
from .server.cli import add_parser as add_server_commands

DEMO_PROMPT = ("Rewrite this list as a markdown table with columns Name, Role and City:\n"
               "- Alice Martin, data engineer, Lyon\n- Bruno Costa, product manager, Porto\n"
               "- Chen Wei, research scientist, Shenzhen\n- Dana Novak, site reliability engineer, Prague\n"
               "- Emeka Obi, designer, Lagos\n- Fatima Zahra, backend developer, Casablanca")


def _generate(args: argparse.Namespace) -> int:
    import torch

    import lookahead

    torch.set_num_threads(args.threads or torch.get_num_threads())
    sampling = _sampling(args)  # bad flags fail before the model loads
    sizes = {k: v for k, v in (("max_nodes", args.max_nodes), ("max_depth", args.max_depth),
                               ("copy_depth", args.copy_depth), ("sizing", args.sizing)) if v is not None}
    engine = lookahead.load(args.model, dtype=args.dtype, device=args.device,
                            draft_config=lookahead.DraftConfig(**sizes), deterministic=args.deterministic,
                            kernels=args.kernels)
    if args.input:
        return _generate_file(engine, args, sampling)
    prompt = args.prompt if args.prompt is not None else DEMO_PROMPT
    if not args.raw and getattr(engine.tokenizer, "chat_template", None):
        prompt = [{"role": "user", "content": prompt}]
    runs = [False, True] if args.compare else [not args.no_draft]
    outputs = []
    for draft in runs:
        stream = engine.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, draft=draft,
                               sampling=sampling)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        label = "lookahead" if draft else "no draft "
        print(f"[{label}] {stream.output.stats.summary()}", file=sys.stderr)
        outputs.append(stream.output)
    if args.compare:
        plain, fast = outputs
        same = "identical" if plain.token_ids == fast.token_ids else "DIFFERENT"
        print(f"[compare] speedup {fast.stats.tokens_per_s / max(plain.stats.tokens_per_s, 1e-9):.2f}x, "
              f"outputs {same}", file=sys.stderr)
    return 0


def _generate_file(engine, args: argparse.Namespace, sampling) -> int:
    """`--input prompts.jsonl`: every line one request, batched; answers in input order to `--output`."""
    import json
    from pathlib import Path

    requests, ids = [], []
    with open(args.input, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = record.get("messages") or record.get("prompt")
                if isinstance(prompt, str) and not args.raw and getattr(engine.tokenizer, "chat_template", None):
                    prompt = [{"role": "user", "content": prompt}]
                requests.append(engine.request(prompt, record.get("max_tokens", args.max_new_tokens),
                                               record.get("stop", args.stop), not args.no_draft, sampling))
            except (ValueError, AttributeError, TypeError) as e:
                raise SystemExit(f"{args.input}:{n}: {e} (expected JSON with 'prompt' or 'messages', "
                                 "optional 'id', 'max_tokens', 'stop')") from None
            ids.append(record.get("id", len(ids)))
    outputs = engine.generate_batch(requests, max_batch=args.max_batch)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for rid, o in zip(ids, outputs, strict=True):
            s = o.stats
            out.write(json.dumps({"id": rid, "text": o.text, "finish_reason": o.finish_reason,
                                  "prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                                  "steps": s.steps, "accepted_per_step": round(s.mean_accepted, 3),
                                  "draft_nodes": s.draft_tokens}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    new = sum(o.stats.new_tokens for o in outputs)
    steps = sum(o.stats.steps for o in outputs)
    where = f" -> {Path(args.output)}" if args.output else ""
    print(f"[lookahead] {len(outputs)} requests, {new} tokens, {new / max(steps, 1):.2f} accepted tokens/step"
          f"{where}", file=sys.stderr)
    return 0


def _sampling(args: argparse.Namespace):
    """Sampling flags -> SamplingParams. A temperature, top-p or top-k implies --do-sample; one seed
    serves both runs of --compare, so that their outputs can be compared token by token."""
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    do_sample = args.do_sample or any(v is not None for v in given.values())
    seed = args.seed
    if do_sample and seed is None and args.compare:
        import random
        seed = random.randrange(2**31)
        print(f"[compare] sampling with seed {seed}", file=sys.stderr)
    from lookahead import SamplingParams
    return SamplingParams.of(do_sample=do_sample, repetition_penalty=args.repetition_penalty, seed=seed, **given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookahead", description="Lossless trie-drafted LLM generation")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("prompt", nargs="?", help="prompt text (default: a demo table-rewriting prompt)")
    gen.add_argument("--model", default=None, help="named model, .gguf file or HF directory")
    add_engine_flags(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--no-draft", action="store_true", help="plain decoding, for comparison")
    gen.add_argument("--compare", action="store_true", help="run without and with drafts, report the speedup")
    gen.add_argument("--input", default=None, metavar="JSONL", help="batch mode: one request per line "
                     "({'prompt' or 'messages', optional 'id', 'max_tokens', 'stop'}), decoded with continuous "
                     "batching")
    gen.add_argument("--output", default=None, metavar="JSONL", help="with --input: answers, in input order "
                     "(default: stdout)")
    gen.add_argument("--max-batch", type=int, default=16, help="with --input: requests decoded together")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--max-nodes", type=int, default=None,
                     help="draft nodes per step at most (default 12, up to 48 where verify cost is flat)")
    gen.add_argument("--max-depth", type=int, default=None, help="longest draft branch")
    gen.add_argument("--copy-depth", type=int, default=None,
                     help="longest draft branch while the output copies its context (default 24, from 12 "
                          "tokens copied in a row; 48: twice that again from 36)")
    gen.add_argument("--sizing", choices=("measured", "fixed"), default=None,
                     help="draft tree size: chosen per step from the measured verify cost (default), or always max")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --do-sample)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (implies --do-sample)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens; 0 = all (implies --do-sample; default 50)")
    gen.add_argument("--seed", type=int, default=None, help="seed of this request's sampler (reproducible runs)")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition_penalty")
    gen.set_defaults(func=_generate)
    add_server_commands(sub)  # serve, warm
    add_bench_command(sub)  # bench
    add_export_command(sub)  # export
    return parser


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """How the model runs, for `generate` and `serve` alike: dtype, device, kernels, deterministic mode."""
    parser.add_argument("--dtype", default="auto", help="auto (default: the fastest with drafting on this machine, "
                        "printed with its reason), float32 (exact reference) or bfloat16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--kernels", choices=("auto", "eager", "packed"), default="auto",
                        help="linear kernels: auto (measured; fp32 stays eager unless --dtype auto), eager, "
                        "packed (oneDNN)")
    parser.add_argument("--deterministic", action="store_true", help="batch- and tree-invariant kernels: the same "
                        "request gets the same answer bit for bit whatever shares its forward (slower forwards)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"lookahead: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
