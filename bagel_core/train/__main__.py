"""``python -m bagel_core.train <upstream arguments> --dataset_info REGISTRY.yaml [--manifest DIR]``.

Takes the arguments of upstream's ``train/pretrain_unified_navit.py`` (see ``--help``). A ConfigError
exits with status 2 and ``error: ...`` on stderr; ``--dry_run`` validates and prints the configuration.
"""

from __future__ import annotations

import json
import sys

from bagel_core.config.errors import ConfigError
from bagel_core.train.args import parse_args, unapplied_arguments, world_size_from_env


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        for note in unapplied_arguments(cfg):
            print(f"warning: {note}", file=sys.stderr)
        if cfg.training.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        world_size = world_size_from_env() or 1
        if world_size > 1:
            raise ConfigError(
                f"WORLD_SIZE={world_size}: this trainer runs a single process so far (the "
                f"torchrun/FSDP trainer is not in place); launch with --nproc_per_node=1 "
                f"--nnodes=1, or add --dry_run to only validate the arguments"
            )
        from bagel_core.train.loop import main

        main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
