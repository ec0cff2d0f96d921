"""Export the tiny preset, run it on two backends, and compare them with each other and with torch.

python examples/export_and_compare.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import portable_moe


def main(output_dir: Path) -> int:
    # verbose: each step and its time on stderr (the export takes tens of seconds on a small machine).
    bundle = portable_moe.export(output_dir / "tiny", preset="tiny", seed=0, overwrite=True, verbose=True)
    print(f"exported {bundle.path} ({bundle.moe_lowering} lowering)")

    # Fresh inputs, not the golden ones: a batch of 3 sequences of 10 tokens.
    input_ids = np.random.default_rng(7).integers(0, bundle.config.vocab_size, size=(3, 10), dtype=np.int64)
    outputs = {}
    for name in ("cpu", "reference"):
        compiled = portable_moe.get_backend(name).compile(bundle)
        outputs[name] = compiled.run({"input_ids": input_ids})
        print(f"{name}: logits {outputs[name]['logits'].shape}, placement {compiled.placement()}")

    comparisons = portable_moe.compare_outputs(outputs["reference"], outputs["cpu"], bundle.routing_outputs)
    for comparison in comparisons:
        figure = (
            f"routing agreement {comparison.routing_agreement:.0%}"
            if comparison.kind == "routing"
            else f"max abs error {comparison.max_abs_error:.2e}"
        )
        print(f"  {comparison.name}: {'ok' if comparison.passed else 'DIFFERS'} ({figure})")

    results = portable_moe.check_bundle(bundle, ["cpu", "reference"], verbose=True)
    for result in results:
        print(f"conformance vs golden data on {result.backend}: {result.status}")
    return 0 if all(c.passed for c in comparisons) and all(r.passed for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory() as scratch:
        sys.exit(main(Path(scratch)))
