"""Print npu-sim's compile report for a bundle: ``python -m backends.npu_sim BUNDLE [options]``."""

from __future__ import annotations

import argparse
import json
import sys

from backends.npu_sim.backend import NpuSimBackend
from backends.npu_sim.precision import PRECISION_MODES
from portable_moe.errors import PortableMoEError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.npu_sim", description=__doc__)
    parser.add_argument("model", help="a bundle directory or an .onnx file")
    parser.add_argument("--precision", choices=PRECISION_MODES, default="force_fp16")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="gears' batch sizes (default 1,2,4,8)")
    parser.add_argument("--seq-lengths", default="32,128,512", help="gears' sequence lengths (default 32,128,512)")
    parser.add_argument("--cache-dir", help="artifact cache (default $PORTABLE_MOE_CACHE/npu-sim or ~/.cache)")
    parser.add_argument("--chip", default="ascend-910b", help="chip for the cost estimate")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    options = {
        "precision": args.precision,
        "batch_sizes": args.batch_sizes,
        "seq_lengths": args.seq_lengths,
        "cache_dir": args.cache_dir,
        "chip": args.chip,
    }
    try:
        report = NpuSimBackend().compile(args.model, options).report()
    except PortableMoEError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
