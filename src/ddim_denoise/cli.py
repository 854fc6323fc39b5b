"""The ``ddim-denoise`` command line: thin wrappers that parse options and call library functions.

Heavy imports (torch, mlflow) happen inside each command so that ``--help`` and bad-input errors stay fast.
Every expected failure (bad params, bad data, bad checkpoint) prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and use a DDIM diffusion denoiser.")

PARAMS_OPT = typer.Option("params.yaml", "--params", "-p", help="params file (DVC's params.yaml)")
SET_OPT = typer.Option(None, "--set", "-S", help="override a param, e.g. -S train.lr=2e-4 (repeatable)")


class UserError(Exception):
    """An expected failure the user can fix; the CLI prints it as one line and exits 2."""


def user_errors(fn):
    """Turn the package's expected errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import EXPECTED_ERRORS

        try:
            return fn(*args, **kwargs)
        except (UserError, *EXPECTED_ERRORS) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_overrides(items: Optional[list[str]]) -> dict[str, object]:
    import yaml

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def load(params_path: str, overrides: Optional[list[str]] = None):
    from .config import load_params

    return load_params(params_path, parse_overrides(overrides))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
