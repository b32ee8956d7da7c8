"""Shared pieces of the entry points: logging set-up and the argument parser style."""

import argparse
import logging
import os


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=level or os.environ.get("HUBERT_PIPELINE_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "urllib3", "git", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--params", default="params.yaml", help="params file")
    return p
