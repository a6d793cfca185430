"""`loraplex generate | serve`."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    from loraplex import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.raw:
        out = llm.generate([args.prompt], params)[0]
    else:
        out = llm.chat([[{"role": "user", "content": args.prompt}]], params)[0]
    print(out.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loraplex import LLM

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    print(
        f"model ready: {llm.engine.model_args.architecture}, {llm.engine.block_manager.num_blocks} KV blocks.\n"
        "The HTTP API (Workers AI and OpenAI dialects) is not built yet; until it is, use "
        "`loraplex generate` or the Python API (loraplex.LLM).",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="default", help='a Hugging Face folder, or "default"')
        p.add_argument("--dtype", default="auto")
        p.add_argument("--device", default="auto")
    gen = sub.choices["generate"]
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    args = parser.parse_args(argv)
    return {"generate": _generate, "serve": _serve}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
