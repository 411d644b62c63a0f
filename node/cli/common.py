"""What every command shares: logging set-up and reading the configuration."""

from __future__ import annotations

import argparse
import logging

from node.config import Config, load_config

#: exit status of a command refused for its configuration (``ainode config check`` and the rest)
EXIT_CONFIG = 2


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def load(args: argparse.Namespace, semantics: bool = True) -> Config:
    return load_config(args.config, check_semantics=semantics)
