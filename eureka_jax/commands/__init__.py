"""Thin entry points for the `eureka-jax` CLI: each module parses its flags and calls the library.

Every module here exposes `main(argv: list[str]) -> int`; logic lives in the library so that a
notebook can call the same functions. Every command answers -h / --help with its flags and example
command lines: argparse commands build their parser with `argument_parser`, the absl-flags ones
(train, sft, which take ml_collections `--config.a.b=value` overrides) parse with
`parse_absl_flags`. Bad flags exit with status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")


def _examples(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def argument_parser(command: str, doc: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of `eureka-jax COMMAND`: `doc` (the module docstring) as its description and the
    example command lines after the flags."""
    return argparse.ArgumentParser(prog=f"eureka-jax {command}", description=doc,
                                   epilog=_examples(examples),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_absl_flags(command: str, doc: str, examples: Sequence[str], flag_values,
                     argv: Sequence[str]) -> int | None:
    """Parse `argv` into absl `flag_values` (a flags.FlagValues). Returns the exit status when the
    command should stop: 0 after printing help (-h, --help), 2 after a bad flag; else None.

    Help is answered before parsing, so it works even when --config names a broken file."""
    from absl import flags

    if any(arg in HELP_FLAGS for arg in argv):
        listing = []
        for name in flag_values:
            flag = flag_values[name]
            default = "" if flag.default is None else f" (default: {flag.default!r})"
            listing.append(f"  --{name}: {flag.help}{default}")
        print(f"usage: eureka-jax {command} [flags]\n\n{doc}\n\nflags:\n" + "\n".join(listing)
              + f"\n\n{_examples(examples)}")
        return 0
    try:
        flag_values([f"eureka-jax {command}", *argv])
        for name in flag_values:  # ml_collections reports a config file it cannot load on first use
            flag = flag_values[name]
            if flag.flag_type() == "config object" and flag.value is not None:
                flag.value.keys()
    except (KeyError, AttributeError) as error:  # ml_collections: --config.a.b names no field
        print(f"eureka-jax {command}: error: {_unknown_field(error, argv)}", file=sys.stderr)
        return 2
    except (flags.Error, OSError) as error:  # OSError: the --config file cannot be loaded
        print(f"eureka-jax {command}: error: {error}\n(see eureka-jax {command} --help)",
              file=sys.stderr)
        return 2
    return None


def _unknown_field(error: BaseException, argv: Sequence[str]) -> str:
    """'--config.train.num_step: no such field (did you mean "num_steps" ...?)' from the KeyError
    (or the AttributeError around it) that ml_collections raises."""
    detail = error
    while isinstance(detail, BaseException) and detail.args:
        detail = detail.args[0]
    name, _, hint = str(detail).partition("\n")
    name = name.strip("'\"")
    paths = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
    culprits = [path for path in paths if name in path.split(".")] or ["a --config override"]
    hint = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
    return (f"{', '.join(culprits)}: the config has no field {name!r}{hint}; the fields and "
            f"their defaults are in eureka_jax/configs_common.py base_config()")
