"""`python -m pretrain.plan --config configs/1t.yaml --nodes 384 --gpus-per-node 8 --gpu h100-80gb`

Plans the configured layout on a cluster (exact size, memory per GPU, step time, fits or not), or with
--search ranks every layout that fits. Config overrides work as for the trainer (dotted key=value after
the flags) and the layout is validated by the trainer's own checks for nodes x gpus-per-node ranks.
Exit codes: 0 fits (with --search: some layout fits), 1 does not fit, 2 invalid configuration,
3 --prove-construction found a problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pretrain.config import Config, ConfigError, load_config
from pretrain.plan.hardware import GPUS, Assumptions, GiB, make_cluster

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_CONFIG_ERROR, EXIT_CONSTRUCTION_FAILED = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Assumptions()
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.plan",
        description="Plan a layout: parameters, FLOPs, memory per GPU, step time, tokens/s, MFU; or --search.",
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/70b.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. parallel.pp=8")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--search", action="store_true", help="rank every layout that fits by tokens/s")
    parser.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    parser.add_argument(
        "--headroom", type=float, default=0.0,
        help="--search keeps layouts that leave this fraction of GPU memory free (e.g. 0.1)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the same numbers as JSON")
    parser.add_argument(
        "--prove-construction", action="store_true",
        help="also build every stage and tensor-parallel shard on the meta device with the trainer's code "
        "and check them (seconds to a minute for the largest models)",
    )  # fmt: skip
    bw = parser.add_argument_group("interconnect and model assumptions (defaults: docs/LAYOUTS.md)")
    bw.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU and direction in a node (NVLink)")
    bw.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU and direction between nodes")
    bw.add_argument("--matmul-efficiency", type=float, help="fraction of peak a large GEMM reaches")
    bw.add_argument("--comm-efficiency", type=float, default=defaults.comm_efficiency)
    bw.add_argument("--fragmentation", type=float, default=defaults.fragmentation)
    bw.add_argument(
        "--runtime-reserve-gib", type=float, default=defaults.runtime_reserve_bytes / GiB,
        help="GiB per GPU outside PyTorch's allocator (CUDA context, NCCL)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.plan.counts import parameter_count
    from pretrain.plan.planner import layout_problems, plan_layout
    from pretrain.plan.report import format_plan, format_search, plan_json, search_json
    from pretrain.plan.search import search_layouts

    gpu = GPUS[args.gpu]
    if args.matmul_efficiency is not None:
        gpu = dataclasses.replace(gpu, matmul_efficiency=args.matmul_efficiency)
    assumptions = Assumptions(
        comm_efficiency=args.comm_efficiency,
        fragmentation=args.fragmentation,
        runtime_reserve_bytes=int(args.runtime_reserve_gib * GiB),
    )
    cluster = make_cluster(
        args.nodes, args.gpus_per_node, gpu, args.intra_node_gbps, args.inter_node_gbps, assumptions
    )
    try:
        # --search replaces the layout, so only the rest of the config has to be valid as given.
        cfg = load_config(args.config, args.overrides, world_size=None if args.search else cluster.world_size)
        if not args.search and (problems := layout_problems(cfg, cluster.world_size)):
            raise ConfigError(problems)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.search:
        result = search_layouts(cfg, cluster, args.headroom)
        if args.json:
            out = search_json(result, args.config, cluster, args.top, parameter_count(cfg))
            print(json.dumps(out, indent=2))
        else:
            print(format_search(result, args.config, cluster, args.top))
        return EXIT_FITS if result.ranked else EXIT_DOES_NOT_FIT
    plan = plan_layout(cfg, cluster)
    out = plan_json(plan, args.config)
    proof_ok = True
    if args.prove_construction:
        from pretrain.plan.construct import prove_construction

        proof = prove_construction(cfg)
        proof_ok = proof.ok
        out["construction"] = {
            "ranks": proof.ranks,
            "expert_parallel_ranks": proof.expert_ranks,
            "ok": proof.ok,
            "problems": proof.problems,
        }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, args.config))
        if args.prove_construction:
            print(format_proof(out["construction"], cfg))
    if not proof_ok:
        return EXIT_CONSTRUCTION_FAILED
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def format_proof(proof: dict, cfg: Config) -> str:
    par = cfg.parallel
    where = (
        f"{proof['ranks']} ranks ({par.pp} stage(s) x {par.tp} tensor-parallel shard(s)) on the meta device"
    )
    if proof["expert_parallel_ranks"]:
        where += f", and the expert slices of {proof['expert_parallel_ranks']} expert-parallel rank(s)"
    if proof["ok"]:
        return (
            f"construction: built {where} with the trainer's code: every shard makes its plain parameter, "
            f"every rank holds the parameters counted above"
        )
    return f"CONSTRUCTION FAILED: {where}:\n" + "\n".join(f"  - {p}" for p in proof["problems"])


if __name__ == "__main__":
    sys.exit(main())
