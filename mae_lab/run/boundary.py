"""Where the command line meets the library: exit codes, the error boundary, SIGTERM, and torchrun's arguments.

Exit codes: 0 success, 1 some trials failed or diverged, or a bug (its traceback and a line saying so), 2 bad input
(``mae_lab.errors.BadInput``: a study file, data, a database URL, an option; or a file the system cannot read or
write), 75 the database server stayed away longer than MAE_LAB_DB_OUTAGE_S (store.outage; the trials stay
resumable), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM: a scheduler's stop or `kill`, handled as Ctrl-C is;
SIGUSR1 138, SIGUSR2 140). Torch-free and database-free: ``mae-lab --help`` loads this module.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from mae_lab.errors import BadInput
from mae_lab.run.progress import Display, make_display

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # the stops a scheduler sends (SLURM's --signal): all end a run


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2), raised where the program is: it unwinds as Ctrl-C does (the running
    trial is marked interrupted, with this message), so a batch scheduler's stop leaves no trial "running" for a
    stale-heartbeat takeover to find. The exit code is 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def stop_handler():
    """A handler that raises Terminated at the first stop signal and ignores the ones after it: under srun and
    torchrun each process gets a stop twice, and a second raise inside the first one's cleanup (marking the trial
    interrupted, removing a temp file) would leave that cleanup half done."""
    fired = []

    def on_stop(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)
    return on_stop


def interrupted_code(exc: KeyboardInterrupt) -> int:
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: MESSAGE`` as one line on stderr (line breaks inside the message become '; ')."""
    message = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    Console(stderr=True, highlight=False).print(f"error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


class Command(TyperCommand):
    """Every command: keeps the argument vector it was given (``ctx.meta["argv"]``, for --nproc to forward), and
    shows no type after --help."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:
        return _plain(super().get_help_option(ctx))


class Group(TyperGroup):
    """A group of commands whose --help shows no type after a flag or a text option (Typer prints ``<bool>`` and
    ``<str>`` there); numbers keep their ranges and paths say so."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            for p in command.params:
                _plain(p)

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:
        return _plain(super().get_help_option(ctx))


def _plain(p):  # noqa: ANN001, ANN202 - a parameter, or None
    text = getattr(getattr(p, "type_descriptor", None), "annotation", None) in (str, list[str])
    if isinstance(p, TyperOption) and p.metavar is None and (p.is_flag or text):
        p.metavar = ""
    return p


BUG = ("error: this is a bug in mae-lab, not in your input (an unexpected {name}, traceback above); please report "
       "it with the command and the traceback")


class Boundary(Group):
    """Every command runs inside this boundary: bad input (BadInput, or a file the system cannot read or write)
    becomes one line on stderr with exit 2, Ctrl-C exit 130, a stop signal 128 + its number (SIGTERM 143). Anything
    else is a bug: its traceback, a line saying so, exit 1 (a trial's own failure is recorded with its traceback in
    the trial, by the runner, and never reaches here)."""

    def invoke(self, ctx):
        main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
        on_stop = stop_handler()
        previous = {sig: signal.signal(getattr(signal, sig), on_stop) for sig in STOP_SIGNALS} if main else {}
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            Console(stderr=True).print("interrupted")
            raise typer.Exit(interrupted_code(exc)) from None
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            # Typer's own (an exit code, a usage error), and a reader that left (`| head`): Typer ends them
            raise
        except BadInput as exc:  # exit 2, or the error's own code (a database server that stayed away: 75)
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:
            if exc.filename is None:
                raise bug(exc) from None
            raise fail(f"{exc.filename}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error is said to be a bug
            raise bug(exc) from None
        finally:
            for sig, handler in previous.items():  # a caller's own handler (a test runner, a notebook) is theirs again
                signal.signal(getattr(signal, sig), handler)


def bug(exc: BaseException) -> typer.Exit:
    """Print ``exc``'s traceback and a line saying it is a bug; exit 1."""
    traceback.print_exception(exc, file=sys.stderr)
    Console(stderr=True, highlight=False).print(BUG.format(name=type(exc).__name__), markup=False, soft_wrap=True)
    return typer.Exit(1)


@contextmanager
def trial_errors(resume_hint: str, display: bool = True) -> Iterator[Display | None]:
    """Yield a progress display (None if not ``display``) and turn bad input into one line with exit 2, and Ctrl-C
    (SIGTERM) into exit 130 (143) with ``resume_hint``."""
    try:
        shown = make_display(Console(highlight=False)) if display else None
        try:
            yield shown
        finally:
            if shown is not None:
                shown.close()
    except BadInput as exc:
        raise fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt as exc:
        Console(stderr=True).print(f"interrupted: the running trial is marked interrupted; {resume_hint}")
        raise typer.Exit(interrupted_code(exc)) from None


def torchrun_rank() -> int | None:
    """This process's rank under torchrun (``WORLD_SIZE`` > 1), else None."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def torchrun_argv(argv: list[str], study: Path) -> list[str]:
    """The ``run`` arguments every torchrun process gets: the user's own, unchanged, minus ``--nproc N`` (or
    ``--nproc=N``). BadInput for a study the processes cannot each read again (a pipe, /dev/stdin)."""
    if not study.is_file():
        raise BadInput(f"--nproc: {study} is not a regular file, and each of torchrun's processes reads the study "
                       "again: save it to a file first")
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True  # its value is the next argument
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
