"""`python -m pretrain.convert to-hf|verify|from-hf|to-fp32 ...` (see docs/CONVERT.md).

Exit codes: 0 done; 1 the conversion was refused (bad input, or an export that failed
verification); the message names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pretrain.errors import ExitCode

EXIT_REFUSED = ExitCode.REFUSED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def checkpoint_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            required=True,
            help="run directory (newest complete checkpoint), its checkpoints/, a step directory, or "
            "consolidated weights (.safetensors or a from-hf folder)",
        )
        p.add_argument("--config", help="the run's config.yaml (default: RUN_DIR/config.yaml)")

    to_hf = commands.add_parser(
        "to-hf",
        help="export to a Hugging Face folder (Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral or Glm4Moe class), verified",
    )
    checkpoint_args(to_hf)
    to_hf.add_argument("--output", required=True, help="folder to create")
    to_hf.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dtype of the written weights; auto: the precision the run trained in",
    )
    to_hf.add_argument(
        "--max-shard-size", default="5GB", help="split the weights into files of at most this size"
    )
    to_hf.add_argument("--tokenizer", help="the run's tokenizer, if it moved since the data was prepared")
    to_hf.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the export with transformers and comparing it with our model (for models too big to "
        "hold twice in memory); run `verify` later",
    )
    to_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    verify = commands.add_parser("verify", help="check an export against the checkpoint it came from")
    checkpoint_args(verify)
    verify.add_argument("--hf", required=True, help="the folder to-hf wrote")

    from_hf = commands.add_parser("from-hf", help="import a Hugging Face folder to train from")
    from_hf.add_argument(
        "--model",
        required=True,
        help="a Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral or Glm4Moe folder (config.json + safetensors)",
    )
    from_hf.add_argument("--output", required=True, help="folder to create; use as checkpoint.init_weights")
    from_hf.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin (unpickling runs code from the file)",
    )
    from_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    to_fp32 = commands.add_parser("to-fp32", help="consolidated fp32 weights in one safetensors file")
    checkpoint_args(to_fp32)
    to_fp32.add_argument("--output", required=True, help="file to create (.safetensors)")
    to_fp32.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion never needs a GPU
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per tiny load would bury the verdict
    except ImportError:
        pass  # transformers is needed only for verification; --no-verify works without it
    from pretrain.convert import commands
    from pretrain.errors import PretrainError

    try:
        if args.command == "to-hf":
            report = commands.to_hf(
                args.checkpoint, args.output, args.dtype, args.max_shard_size, args.tokenizer, args.config,
                verify=not args.no_verify, overwrite=args.overwrite,
            )  # fmt: skip
        elif args.command == "verify":
            result = commands.verify_hf(args.hf, args.checkpoint, args.config)
            print(result.summary())
            return 0 if result.passed else EXIT_REFUSED
        elif args.command == "from-hf":
            report = commands.from_hf(args.model, args.output, args.allow_pickle, args.overwrite)
        else:
            report = commands.to_fp32(args.checkpoint, args.output, args.config, args.overwrite)
    except PretrainError as e:  # a conversion refused, or a config or checkpoint it cannot use
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"wrote {report.output}: {', '.join(report.files)}")
    print("from: " + json.dumps(report.provenance))
    for note in report.notes:
        print(note)
    if report.verification is not None:
        print(report.verification.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
