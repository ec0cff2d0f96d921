"""The CPU in-place decoder with its attention fused (GroupQueryAttention) against the same graph unfused,
step for step in one process.

    python scripts/decode_attention_ab.py build/small --context 128,1024,4096 --steps 32 --threads 1,2

For each thread count both decoders are compiled (the unfused one is what the CPU ran before the
fusion: the preallocated-cache graph with its RMS norms fused); for each context both prefill the same
``context - steps`` random tokens, then decode ``steps`` steps, each with one new random token fed to
both, alternating which goes first, so that the machine's load falls on both alike. Prints the median
wall and CPU (process) milliseconds per step and their ratio. A shared machine moves the absolute
figures; the ratio within one run is what this measures.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from portable_moe import load_bundle
from portable_moe.run import fused_attention
from portable_moe.run.generation import Generator


def _generators(bundle, threads: int) -> dict[str, Generator]:
    fused = Generator(bundle, "cpu", {"threads": threads})
    fuse = fused_attention.fuse_group_query_attention
    fused_attention.fuse_group_query_attention = lambda *args, **kwargs: None
    try:
        unfused = Generator(bundle, "cpu", {"threads": threads})
    finally:
        fused_attention.fuse_group_query_attention = fuse
    if not fused.fused_attention or unfused.fused_attention or not unfused.writes_in_place:
        raise SystemExit("the bundle's decoder did not give a fused and an unfused in-place decoder on cpu")
    return {"unfused": unfused, "fused": fused}


def _compare(generators: dict[str, Generator], context: int, steps: int, rng: np.random.Generator) -> dict:
    vocab = next(iter(generators.values())).config.vocab_size
    prompt = rng.integers(0, vocab, (1, context - steps))
    caches = {}
    for name, generator in generators.items():
        caches[name] = generator.step(prompt, generator.empty_cache(1, context)).cache
    wall: dict[str, list[float]] = {name: [] for name in generators}
    cpu: dict[str, list[float]] = {name: [] for name in generators}
    for step in range(steps):
        token = rng.integers(0, vocab, (1, 1))
        order = list(generators) if step % 2 == 0 else list(generators)[::-1]
        for name in order:
            started, started_cpu = time.perf_counter(), time.process_time()
            caches[name] = generators[name].step(token, caches[name]).cache
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return {name: (1e3 * float(np.median(wall[name])), 1e3 * float(np.median(cpu[name]))) for name in generators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a generation bundle (export ... --generation)")
    parser.add_argument("--context", default="128,1024,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    print("threads | context | unfused ms/step (CPU) | fused ms/step (CPU) | unfused / fused (wall, CPU)")
    for threads in (int(value) for value in args.threads.split(",")):
        generators = _generators(bundle, threads)
        rng = np.random.default_rng(0)
        for context in (int(value) for value in args.context.split(",")):
            result = _compare(generators, context, args.steps, rng)
            (unfused_wall, unfused_cpu), (fused_wall, fused_cpu) = result["unfused"], result["fused"]
            print(
                f"{threads} | {context} | {unfused_wall:.2f} ({unfused_cpu:.2f}) | {fused_wall:.2f} ({fused_cpu:.2f}) | "
                f"{unfused_wall / fused_wall:.2f}x, {unfused_cpu / fused_cpu:.2f}x",
                flush=True,
            )
        del generators
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
