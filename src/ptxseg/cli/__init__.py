"""The command line: the only package that reads argv. Each command parses its options and
calls one library function; library errors (``PtxsegError``) become one red line on stderr
and exit code 2, never a traceback; warnings and notes the library hands back become one line
each.

Commands by group: :mod:`ptxseg.cli.data` (synth, inspect, prepare, config show),
:mod:`ptxseg.cli.train` (train, demo), :mod:`ptxseg.cli.models` (tune, evaluate, predict,
export), :mod:`ptxseg.cli.serve` (serve), :mod:`ptxseg.cli.dicom_node` (dicom-node); what
they share: :mod:`ptxseg.cli.app`.
"""

from __future__ import annotations

import sys

import typer

from ptxseg.cli import data, dicom_node, models, serve, train  # noqa: F401 - registers commands
from ptxseg.cli.app import app, err_console, print_error
from ptxseg.errors import PtxsegError

__all__ = ["app", "main", "run"]


def _choice_error(exc: typer.BadParameter) -> str | None:
    """``--at: unknown 'half' (valid: native, model)`` for a value outside an option's
    choices; None for any other bad parameter."""
    import re

    desc = getattr(exc.param, "type_descriptor", None)
    if desc is None or not desc.is_choice or not desc.choices:
        return None
    given = re.search(r"'(.*)' is not one of", exc.message)
    valid = ", ".join(str(getattr(c, "value", c)) for c in desc.choices)
    name = exc.param.opts[0] if exc.param.opts else exc.param.name
    return f"{name}: unknown {given[0].split(' is')[0] if given else 'value'} (valid: {valid})"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning library errors into one line and exit code 2 (a value
    outside an option's choices too; other usage errors print click's usage and message)."""
    try:
        code = app(args=argv, prog_name="ptxseg", standalone_mode=False)
    except typer.BadParameter as exc:
        message = _choice_error(exc)
        if message is None:
            exc.show()
            return exc.exit_code
        print_error(message)
        return 2
    except typer.TyperException as exc:  # usage errors: unknown command, missing argument...
        show = getattr(exc, "show", None)
        if show is None:
            print_error(str(exc))
            return 2
        show()
        return getattr(exc, "exit_code", 2)
    except typer.Abort:
        err_console.print("Aborted.", markup=False, highlight=False)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except PtxsegError as exc:
        print_error(str(exc))
        return 2
    except OSError as exc:  # disk full, permission denied, a name the OS refuses...
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    return code if isinstance(code, int) else 0


def run() -> None:  # console script
    sys.exit(main())

