"""The `hybridpd demo-model` sub-command: argument definitions and entry point.

Owns turning command-line arguments into one `write_demo_model` call and a one-line summary.
Must not know how models are written; the top-level `hybridpd/cli.py` registers the sub-command
with `add_arguments(parser)` and calls `main(args)`.
"""

from __future__ import annotations

import argparse
import sys

from hybridpd.demo.presets import PRESETS
from hybridpd.demo.writer import write_demo_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created; must be empty)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument(
        "--num-layers", type=int, default=None, help="keep only the first N layers of the pattern"
    )
    parser.add_argument(
        "--dtype", default=None, help="weight dtype: float32, float16 or bfloat16 (preset default)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the weights/configs of a non-empty --out"
    )


def main(args: argparse.Namespace) -> int:
    try:
        info = write_demo_model(
            args.out,
            args.preset,
            seed=args.seed,
            num_layers=args.num_layers,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=True,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"hybridpd demo-model: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {info.preset} ({info.num_layers} layers, {info.num_params / 1e6:.1f}M params, "
        f"{info.total_bytes / 2**20:.1f} MiB, vocab {info.vocab_size}) to {info.path}"
    )
    return 0


if __name__ == "__main__":  # python -m hybridpd.demo.cli ...
    _parser = argparse.ArgumentParser(prog="hybridpd demo-model")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
