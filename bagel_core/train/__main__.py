"""``[torchrun ...] python -m bagel_core.train <upstream arguments> [--dataset_info REGISTRY.yaml]``.

Takes the arguments of upstream's ``train/pretrain_unified_navit.py`` (see ``--help``). Every check
runs before a process group exists; a ConfigError exits with status 2 and ``error: ...`` on
stderr. ``--dry_run True`` prints the launch plan (mesh, data, where every weight, the EMA, the
optimizer state and the data position come from, the memory plan) and the resolved arguments as JSON, the
memory plan's table on stderr, then exits 0.
"""

from __future__ import annotations

import json
import sys

from bagel_core.config.errors import CheckpointSaveError, ConfigError, DataError, NonFiniteLossError
from bagel_core.train.args import parse_args, unapplied_arguments, world_size_from_env


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        for note in unapplied_arguments(cfg):
            print(f"warning: {note}", file=sys.stderr)
        from bagel_core.train.preflight import preflight  # torch and the data stack load after --help

        launch = preflight(cfg, world_size_from_env() or 1, world_size_from_env("LOCAL_WORLD_SIZE"))
        if cfg.training.dry_run:
            print(json.dumps({"plan": launch.describe(cfg), "arguments": cfg.to_dict()}, indent=2, default=str))
            if launch.memory is not None:  # the table for people; stdout stays one JSON document
                print(launch.memory.table(), file=sys.stderr)
            return 0
        from bagel_core.train.trainer import main

        main(cfg, launch)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointSaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
