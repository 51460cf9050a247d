"""cascade-eval --ckpt PATH --suite tiny [--out results.json] [--limit N] [--k 4] ...

Per-domain held-out evaluation of any checkpoint `load_pretrained` reads (run dir, one step, converted
or HF dir): greedy accuracy, mean reward and pass@k, printed as a table; the JSON result goes to --out
(written atomically, only once everything succeeded). See `cascade_jax.rl.eval_suite`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cascade_jax.cli.generate import write_atomically

PROG = "cascade-eval"


class UsageError(ValueError):
    """A one-line user-facing error (bad input, not a bug)."""


def fail(error: BaseException | str) -> int:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def check_out(out: str, ckpt: str) -> None:
    """--out must be a file path in an existing folder, outside the checkpoint directory."""
    path = os.path.realpath(out)
    if os.path.isdir(path):
        raise UsageError(f"--out {out} is a directory; give a file path such as results.json")
    if not os.path.isdir(os.path.dirname(path)):
        raise UsageError(f"--out {out}: folder {os.path.dirname(out) or '.'} does not exist")
    if os.path.exists(ckpt):
        home = os.path.realpath(ckpt)
        if os.path.commonpath([home, path]) == home:
            raise UsageError(f"--out {out} is inside the checkpoint directory {ckpt}; write it elsewhere")


def positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= 1, got {value}")
        return value
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's usage + message, but as the one-line error of this command
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description="Per-domain held-out evaluation: greedy accuracy and pass@k.",
                    epilog="example: cascade-eval --ckpt runs/sft-tiny --suite tiny --limit 48 --out eval.json")
    parser.add_argument("--ckpt", required=True, help="HF dir, converted checkpoint, run dir or one of its steps")
    parser.add_argument("--suite", default="tiny", help="a bundled suite (tiny) or a .jsonl of records "
                                                        '{"messages", "domain", "verifier"}')
    parser.add_argument("--out", help="JSON result, written atomically (not inside the checkpoint)")
    parser.add_argument("--limit", type=positive("--limit"), help="the first N prompts of each domain")
    parser.add_argument("--k", type=positive("--k"), default=4, help="pass@k (default 4)")
    parser.add_argument("--samples", type=positive("--samples"),
                        help="samples per prompt at temperature 1 for pass@k (default k; at least k)")
    parser.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), help="default: the suite's")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="open the assistant turn with <think> (default: the suite's setting)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the checkpoint's tokenizer.json, else "
                                            "the suite's bundled one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", help="comma-separated subset, e.g. math,code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")

    from cascade_jax.rl.eval_suite import evaluate, format_table, load_model_and_tokenizer, prepare
    from cascade_jax.weights.safetensors_dir import CheckpointError

    try:
        if args.samples is not None and args.samples < args.k:
            raise UsageError(f"--samples {args.samples} is less than --k {args.k}")
        domains = None
        if args.domains is not None:
            domains = [d.strip() for d in args.domains.split(",") if d.strip()]
            if not domains:
                raise UsageError("--domains: expected a comma-separated list of domains")
        prepare(args.suite, domains=domains, limit_per_domain=args.limit)   # suite errors before the model loads
        if args.out:
            check_out(args.out, args.ckpt)
        if not os.path.exists(args.ckpt):
            raise UsageError(f"--ckpt {args.ckpt}: no such directory")
        model, tokenizer = load_model_and_tokenizer(args.ckpt, args.tokenizer, args.suite)
        result = evaluate(model, tokenizer, args.suite, limit_per_domain=args.limit, pass_k=args.k,
                          samples=args.samples, max_new_tokens=args.max_new_tokens, thinking=args.thinking,
                          seed=args.seed, domains=domains, progress=not args.quiet)
        result["checkpoint"] = args.ckpt
        print(format_table(result), flush=True)
        if args.out:
            write_atomically(args.out, json.dumps(result, indent=1) + "\n")
            print(f"{PROG}: wrote {args.out}", file=sys.stderr)
    except (CheckpointError, UsageError, ValueError, OSError) as e:
        return fail(e)
    except KeyboardInterrupt:
        return fail("interrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
