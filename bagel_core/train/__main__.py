"""``python -m bagel_core.train --dataset_config_file ... --registry_file ... --manifest_dir ...``."""

from __future__ import annotations

import sys

from bagel_core.config.errors import ConfigError
from bagel_core.train.config import parse_args
from bagel_core.train.loop import main


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
