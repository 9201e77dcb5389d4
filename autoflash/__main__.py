"""The command line: ``autoflash doctor [--json]``, ``autoflash demo`` and ``autoflash models``."""

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
    commands.add_parser("models", help="every causal language model in the installed transformers, and whether "
                                       "autoflash serves it (whole model, per layer) or why not, as a Markdown table")
    args = parser.parse_args(argv)
    if args.command == "models":
        return _print_models()
    if args.command == "doctor":
        from autoflash import doctor as doctor_module

        return doctor_module.main(args.json)
    from autoflash import demo as demo_module

    return demo_module.run(seed=args.seed, new_tokens=args.new_tokens)


def _print_models() -> int:
    import logging
    import warnings

    import transformers

    from autoflash import models_table

    transformers.logging.set_verbosity_error()  # (each default config's own complaints are not the table's)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(models_table.registry_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
