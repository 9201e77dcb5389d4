"""The command line: ``autoflash doctor [--json]`` and ``autoflash demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autoflash", description="FlashAttention for LLaMA models in "
                                     "transformers, with zero code changes.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="what is installed, what is active, and why")
    doctor.add_argument("--json", action="store_true", help="print autoflash.status() as JSON")
    demo = commands.add_parser("demo", help="train and decode a small random LLaMA with autoflash and with eager")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from autoflash import doctor as doctor_module

        return doctor_module.main(args.json)
    from autoflash import demo as demo_module

    return demo_module.run(seed=args.seed, new_tokens=args.new_tokens)


if __name__ == "__main__":
    sys.exit(main())
