"""``portable-moe generate``: greedy or sampled generation with a key/value cache on one backend."""

from __future__ import annotations

import argparse
import json
from typing import Any

from portable_moe.errors import InputError


def parse_token_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``.

    Raises:
        InputError: for anything that is not a comma-separated list of integers.
    """
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--prompt-ids takes comma-separated integers (e.g. 1,2,3), got {text!r}") from None
    if not ids:
        raise InputError("--prompt-ids is empty; give at least one token id (e.g. 1,2,3)")
    return ids


def add_command(commands: Any) -> None:
    """Add ``generate`` to the CLI."""
    generate = commands.add_parser(
        "generate",
        help="generate tokens with a key/value cache on a backend (bundles exported with --generation)",
        description="Prefill the prompt, then decode one token per step with the bundle's cache-carrying "
        "decoder graph, printing tokens as they come and ending with prefill and decode tokens/s.",
    )
    generate.add_argument("bundle", help="bundle directory (exported with --generation)")
    generate.add_argument("--backend", default="cpu", help="backend name (default: cpu)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    prompt.add_argument(
        "--prompt",
        metavar="TEXT",
        help="prompt text, for bundles that carry a tokenizer (Hugging Face checkpoints that had one); "
        "prints the generated text",
    )
    generate.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples from the softmax"
    )
    generate.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0, all)"
    )
    generate.add_argument("--seed", type=int, default=0, help="sampler seed; same seed, same tokens (default: 0)")
    generate.add_argument(
        "--no-iobinding",
        action="store_true",
        help="copy the cache through numpy between steps even where the runtime could keep it (for comparison)",
    )
    generate.add_argument("--json", metavar="FILE", help="write prompt, generated ids, per-step experts and timings")
    generate.add_argument(
        "-O",
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="backend option, repeatable (e.g. -O threads=2); see 'portable-moe backends --options'",
    )
    generate.set_defaults(handler=command_generate)


def command_generate(args: argparse.Namespace) -> int:
    """Run ``portable-moe generate``; returns the exit code."""
    from portable_moe.bundle import load_bundle
    from portable_moe.cli.console import EXIT_OK, parse_options, print_result, show_step, stdout
    from portable_moe.run.generation import Generator, check_sampling
    from portable_moe.run.text import TextStream, encode_prompt, load_tokenizer

    prompt = parse_token_ids(args.prompt_ids) if args.prompt is None else []
    check_sampling(args.temperature, args.top_k)
    bundle = load_bundle(args.bundle)
    text = None
    if args.prompt is not None:
        text = TextStream(load_tokenizer(bundle))
        prompt = encode_prompt(text.tokenizer, args.prompt)
    show_step(f"compiling the decoder graph for {args.backend}")
    generator = Generator(bundle, args.backend, parse_options(args.option), io_binding=not args.no_iobinding)
    generator.check_prompt(prompt, args.max_new_tokens)
    shown = f"prompt: {' '.join(map(str, prompt))}" + ("" if text is None else f" ({args.prompt!r})")
    print_result(shown, markup=False)
    stdout.print("generated:", end="" if text is None else " ")

    def stream(token: int) -> None:
        stdout.print(f" {token}" if text is None else text.add(token), end="", markup=False, soft_wrap=True)
        stdout.file.flush()

    result = generator.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        on_token=stream,
    )
    stdout.print()
    decode = result.decode_tokens_per_second
    decode_text = "-" if decode != decode else f"{decode:.1f}"
    print_result(
        f"{generator.backend.name}: prefill {result.prefill_tokens_per_second:.1f} tokens/s "
        f"({len(prompt)} tokens), decode {decode_text} tokens/s ({len(result.tokens) - 1} steps), "
        f"cache through {result.io}"
        + (", preallocated and written in place" if generator.writes_in_place else "")
        + (", attention fused (GroupQueryAttention)" if generator.fused_attention else "")
    )
    if args.json:
        report = {"bundle": str(bundle.path), "backend": generator.backend.name, **result.to_dict()}
        report["sampling"] = {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
        if text is not None:
            report.update(prompt_text=args.prompt, generated_text=text.text)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    return EXIT_OK


def print_generation_checks(checks: list[Any]) -> None:
    """The token-level comparison per backend as a table, long reasons as numbered notes below it."""
    from rich.table import Table

    from portable_moe.cli.console import Notes, print_result

    notes = Notes()
    table = Table(title="generation: greedy continuation vs golden (teacher-forced)")
    for column in (
        "backend",
        "status",
        "steps",
        "tokens agree",
        "first divergence",
        "routing agree",
        "logit rel err",
        "notes",
    ):
        table.add_column(column)
    for check in checks:
        agreement = check.token_agreement
        table.add_row(
            check.backend,
            check.status,
            str(check.steps),
            "-" if agreement != agreement else f"{agreement:.0%}",
            "-" if check.first_divergence is None else str(check.first_divergence),
            f"{min(check.routing_agreement):.0%}" if check.routing_agreement else "-",
            f"{max(check.logit_errors):.2e}" if check.logit_errors else "-",
            notes.add(check.reason),
        )
    print_result(table)
    notes.print()
