"""`python -m pretrain.data COMMAND`: train-tokenizer, prepare, inspect, merge, export-stdlib."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def _texts(inputs: list[str], text_field: str) -> Iterator[str]:
    from pretrain.data.prepare import read_documents, resolve_inputs

    for source in resolve_inputs(inputs):
        yield from read_documents(source, text_field)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from pretrain.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(_texts(args.input, args.text_field), args.vocab_size, args.output)
    print(
        f"{args.output}: vocabulary {tokenizer.vocab_size}, end-of-document id {tokenizer.eod_id}, hash {tokenizer.content_hash[:16]}"
    )


def cmd_prepare(args: argparse.Namespace) -> None:
    from pretrain.data.prepare import manifest_summary, prepare

    manifest = prepare(
        args.input, args.tokenizer, args.output, args.text_field, args.workers, args.shard_tokens,
        args.shard_index, args.num_shards, not args.no_eod,
    )  # fmt: skip
    if manifest is None:
        print(
            f"part {args.shard_index} of {args.num_shards} done; manifest.json follows when every part is done"
        )
    else:
        print(json.dumps(manifest_summary(manifest), indent=2))


def cmd_inspect(args: argparse.Namespace) -> None:
    from pretrain.data.indexed import IndexedDataset
    from pretrain.data.manifest import check_vocabulary, verify
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.errors import DataError

    folder = Path(args.dataset)
    manifest = verify(folder, checksums=not args.no_checksums)
    print(
        f"dataset {folder}: {manifest.num_tokens:,} tokens in {manifest.num_documents:,} documents, {len(manifest.shards)} shards ({manifest.dtype})"
    )
    print(
        f"tokenizer {manifest.tokenizer_hash[:16]} (vocabulary {manifest.vocab_size}, end-of-document {manifest.eod_id}); source {manifest.source}"
    )
    for shard in manifest.shards:
        print(
            f"  {shard.prefix}: {shard.num_tokens:,} tokens, {shard.num_documents:,} documents, sha256 {shard.bin_sha256[:16]}"
        )
    print("checksums: " + ("skipped" if args.no_checksums else "all match the manifest"))
    tokenizer_path = args.tokenizer or manifest.source.get("tokenizer")
    if not tokenizer_path or not Path(tokenizer_path).exists():
        print(f"first document: not decoded (tokenizer {tokenizer_path} not found; pass --tokenizer)")
        return
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.content_hash != manifest.tokenizer_hash:
        raise DataError(
            f"tokenizer {tokenizer_path} (hash {tokenizer.content_hash[:16]}) is not the one {folder} was "
            f"prepared with ({manifest.tokenizer_hash[:16]}); pass --tokenizer with the original"
        )
    check_vocabulary(manifest, folder, tokenizer)
    first = IndexedDataset(folder / manifest.shards[0].prefix).document(0)
    print(f"first document ({len(first)} tokens):\n{tokenizer.decode(first.tolist())[:600]}")


def cmd_merge(args: argparse.Namespace) -> None:
    from pretrain.data.prepare import manifest_summary, merge

    manifest = merge(args.dataset)
    assert manifest is not None
    print(json.dumps(manifest_summary(manifest), indent=2))


def cmd_export_stdlib(args: argparse.Namespace) -> None:
    import sysconfig

    from pretrain.data.builtin import stdlib_documents

    root = Path(sysconfig.get_paths()["stdlib"])
    documents = stdlib_documents(root)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w") as f:
        for path in documents:
            text = path.read_bytes().decode("utf-8", errors="replace")
            f.write(json.dumps({"text": text, "path": path.relative_to(root).as_posix()}) + "\n")
    os.replace(tmp, output)  # a half-written corpus must not look like a whole one
    print(f"{output}: {len(documents)} documents from the Python standard library")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", nargs="+", required=True, help="files or globs (jsonl, json, parquet, txt)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument(
        "--output", required=True, help="folder for tokenizer.json (a Hugging Face tokenizer folder)"
    )
    p.add_argument("--text-field", default="text")
    p.set_defaults(run=cmd_train_tokenizer)

    p = commands.add_parser("prepare", help="tokenize text into Megatron-format shards with a manifest")
    p.add_argument("--input", nargs="+", required=True, help="files, globs, or a hub dataset name")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding one")
    p.add_argument("--output", required=True, help="dataset folder")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="tokenizer processes")
    p.add_argument(
        "--shard-tokens", type=int, default=100_000_000,
        help="a shard closes after the document that brings it to this many tokens",
    )  # fmt: skip
    p.add_argument("--no-eod", action="store_true", help="do not append end-of-document to each document")
    p.add_argument("--shard-index", type=int, default=0, help="this array job's index (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-shards", type=int, default=1, help="number of array jobs")
    p.set_defaults(run=cmd_prepare)

    p = commands.add_parser("inspect", help="counts, checksums and a decoded sample of a prepared dataset")
    p.add_argument("dataset")
    p.add_argument("--no-checksums", action="store_true", help="skip reading every shard for its sha256")
    p.add_argument("--tokenizer", help="tokenizer for the decoded sample (default: the one prepare used)")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser(
        "merge", help="write manifest.json from finished array-job parts (prepare does this by itself)"
    )
    p.add_argument("dataset")
    p.set_defaults(run=cmd_merge)

    p = commands.add_parser(
        "export-stdlib", help="write the built-in corpus (Python's standard library) as jsonl"
    )
    p.add_argument("--output", required=True)
    p.set_defaults(run=cmd_export_stdlib)

    args = parser.parse_args(argv)
    from pretrain.errors import ExitCode, PretrainError, exit_code_of

    try:
        args.run(args)
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_of(e)  # 4 for unusable data, as in training
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.REFUSED
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
