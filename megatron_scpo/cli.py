"""`scpo` command line: train, eval, report, convert, launch, data.

Each subcommand's implementation lives in its package and is imported only when used, so
`scpo --help` stays fast and does not import Megatron.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, function, one-line help); the module adds its own arguments via
# `add_arguments(parser)` when it defines one.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("megatron_scpo.trainer.run", "main", "run warm-start SFT, stage 1 and stage 2 from a config"),
    "eval": ("megatron_scpo.trainer.eval_cli", "main", "evaluate a checkpoint on a config's eval set"),
    "report": ("megatron_scpo.trainer.report", "main", "compare run dirs: Markdown table + PNG plot"),
    "convert": ("megatron_scpo.convert.cli", "main", "convert checkpoints: gguf-to-hf, hf-to-mcore, mcore-to-hf"),
    "launch": ("megatron_scpo.launch_plan", "main", "print the per-node commands of a SLURM plan"),
    "data": ("megatron_scpo.data.formats", "main", "convert datasets: gsm8k, math, aime, deepscaler, champ -> JSONL"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="scpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose one of {list(SUBCOMMANDS)}")
    module_name, func_name, _ = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    try:
        return int(getattr(module, func_name)(argv[1:]) or 0)
    except (ValueError, OSError) as e:  # bad input (config field, data file line/field, path) in any subcommand
        if os.environ.get("SCPO_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split("\n"))
        print(f"scpo {argv[0]}: error: {msg} (SCPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
