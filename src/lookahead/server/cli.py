"""`lookahead serve` and `lookahead warm`: registered on the main parser by `add_parser`.

Heavy imports (torch, FastAPI, uvicorn) happen inside the handlers, so `lookahead --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(sub) -> None:
    from ..cli import add_engine_flags  # the module that calls this one, loaded by now
    """Register the `serve` and `warm` subcommands on the CLI's subparsers."""
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with batched tree verification")
    serve.add_argument("--model", default=None, help="named model, .gguf file or HF directory (default: embedded)")
    serve.add_argument("--served-model-name", default=None, help="model id clients send (default: --model or "
                       "'smollm2-135m')")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("LOOKAHEAD_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $LOOKAHEAD_API_KEY)")
    serve.add_argument("--protect-ops", action="store_true",
                       help="with --api-key: /metrics, /openapi.json and /health's details need the key too "
                       "(/health without it answers only its status)")
    serve.add_argument("--trie", default=None, metavar="PATH", help="shared trie file: loaded at start, "
                       "saved periodically and on shutdown")
    serve.add_argument("--save-every", type=float, default=300.0, metavar="SECONDS",
                       help="trie save interval (0: only on shutdown)")
    add_engine_flags(serve)
    serve.add_argument("--no-draft", action="store_true", help="plain batched decoding, for comparison")
    serve.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    serve.add_argument("--max-cache-tokens", type=int, default=None, help="bound of the batch's KV cache in tokens "
                       "(rows x longest row, padded; default 16384): long prompts wait for room")
    serve.add_argument("--max-nodes", type=int, default=None,
                       help="draft nodes per row at most (default 12, up to 48 where verify cost is flat)")
    serve.add_argument("--sizing", choices=["measured", "fixed"], default=None,
                       help="measured (default): trees cut to what pays on the measured cost curve for the "
                       "batch; fixed: whole trees every step")
    serve.add_argument("--max-depth", type=int, default=None, help="longest draft branch")
    serve.add_argument("--copy-depth", type=int, default=None,
                       help="longest draft branch while a row copies its context (default 24, from 12 "
                            "tokens copied in a row; 48: twice that again from 36)")
    serve.add_argument("--trie-capacity", type=int, default=None, help="node bound of the shared trie")
    serve.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    serve.add_argument("--temperature", type=float, default=0.0,
                       help="temperature when a request gives none (default 0: greedy, exact)")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    warm = sub.add_parser("warm", help="build a shared trie from a JSONL corpus of prompts/answers")
    warm.add_argument("--corpus", required=True, help="JSONL: {'messages': [...]}, {'prompt', 'completion'} or "
                      "{'text'} per line")
    warm.add_argument("--out", required=True, help="trie file to write (safetensors, atomic)")
    warm.add_argument("--model", default=None, help="whose tokenizer (must match the server's model)")
    warm.add_argument("--append", action="store_true", help="add to the trie already in --out")
    warm.add_argument("--raw", action="store_true", help="no chat template around prompts")
    warm.add_argument("--include-prompts", action="store_true", help="learn the prompts too, not only answers")
    warm.add_argument("--trie-capacity", type=int, default=None, help="node bound of the trie")
    warm.add_argument("--max-depth", type=int, default=None, help="longest draft branch the server will use")
    warm.add_argument("--no-progress", action="store_true")
    warm.set_defaults(func=_warm)


def _draft_config(args: argparse.Namespace):
    from ..engine import DraftConfig
    sizes = {k: v for k, v in (("max_nodes", getattr(args, "max_nodes", None)), ("max_depth", args.max_depth),
                               ("copy_depth", getattr(args, "copy_depth", None)),
                               ("capacity", args.trie_capacity), ("sizing", getattr(args, "sizing", None)))
             if v is not None}
    return DraftConfig(**sizes)


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..engine import load
    from .app import create_app

    if args.protect_ops and not args.api_key:
        print("lookahead: --protect-ops needs --api-key (or $LOOKAHEAD_API_KEY)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _draft_config(args)
    engine = load(args.model, dtype=args.dtype, device=args.device, draft_config=config,  # cost curve: cached
                  deterministic=args.deterministic, kernels=args.kernels)
    logging.getLogger("lookahead.server").info("forward cost %s", engine.cost)
    name = args.served_model_name or args.model or "smollm2-135m"
    app = create_app(engine, model_name=name, api_key=args.api_key, trie_path=args.trie, save_every=args.save_every,
                     max_batch=args.max_batch, draft=not args.no_draft,
                     max_tokens_limit=args.max_tokens_limit, default_temperature=args.temperature,
                     protect_ops=args.protect_ops,
                     **({"max_cache_tokens": args.max_cache_tokens} if args.max_cache_tokens else {}))
    print(f"lookahead: serving {name} on http://{args.host}:{args.port}/v1 (trie: {app.state.trie_status})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=10)
    return 0


def _warm(args: argparse.Namespace) -> int:
    from ..drafting.state import DraftState
    from ..drafting.warm import load_tokenizer, warm

    config = _draft_config(args)
    if args.append and os.path.exists(args.out):
        trie = DraftState.load(args.out, capacity=config.capacity).trie
    else:
        trie = config.new_trie()
    tokenizer = load_tokenizer(args.model)
    report = warm(args.corpus, args.out, tokenizer, trie, raw=args.raw, include_prompts=args.include_prompts,
                  progress=not args.no_progress)
    print(f"lookahead: {report.summary()}; saved to {args.out}", file=sys.stderr)
    return 0
