"""``bagel plan-memory``: what a training launch needs per GPU and per node, before anything runs.

    bagel plan-memory [--nproc_per_node N] [--nnodes N] [--json] <training arguments...>

The training arguments are those of ``python -m bagel_core.train`` (upstream's names: ``--max_num_tokens``,
``--num_shard``, ``--cpu_offload``, ``--freeze_und`` ...), including ``--device_memory_gb`` (plan for GPUs of
that size; default: this machine's GPU, else its CPU and RAM), ``--host_memory_gb`` and ``--plan_ce_tokens``.
Nothing is read but the model's configuration: the dataset arguments may point anywhere, and a
``--model_path`` that is not here is planned as the released BAGEL-7B-MoT. Prints the table (bytes per rank
for weights, gradients, AdamW, EMA, gathered units, activations, CE logits, VAE; host RAM per node), the
verdict and the smallest change that fits; exit status 0 when it fits, 1 when not. The trainer's
``--dry_run`` prints the same table and its start-up refuses a launch that does not fit.

    bagel plan-memory --nproc_per_node 4 --device_memory_gb 80 --num_shard 4 --model_path models/BAGEL-7B-MoT \\
        --max_num_tokens 11520 --max_num_tokens_per_sample 10240 --cpu_offload True --freeze_und True
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plan-memory``; every argument it does not know is a training argument (``bagel.cli.main``
    passes them as ``training_args``)."""
    p = subparsers.add_parser(
        "plan-memory",
        help="memory per GPU and per node of a training launch: table, verdict, the smallest change that fits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--nproc_per_node", type=int, default=1, help="processes (GPUs) per node (default: 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (the table is one of its fields)")
    p.set_defaults(func=run_plan_memory, takes_training_args=True)
    return p


def run_plan_memory(args: argparse.Namespace) -> int:
    from bagel_core.config.errors import ConfigError
    from bagel_core.train.preflight import plan_for_arguments

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise ConfigError("--nproc_per_node and --nnodes must be >= 1")
    plan = plan_for_arguments(list(getattr(args, "training_args", [])), args.nnodes, args.nproc_per_node)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1
