"""How a CLI command runs and reports: the output formats, user errors as one line (exit 2), usage errors as one
line, and the global -v/-q/--no-color settings. cli.py declares the commands; this is what they share.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, NoReturn

import typer

# typer >= 0.25 carries its own copy of click, whose Context and exceptions are the ones raised; older typer uses click
try:
    from typer._click.core import Context
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - an older typer
    from click import Context, UsageError  # type: ignore[assignment]
from typer.core import TyperGroup

from .errors import AdapterMismatchError, LorafitError

FORMATS = ("table", "json", "github", "sarif")


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    github = "github"
    sarif = "sarif"


@dataclass
class Settings:
    """The global options (lorafit -v/-q/--no-color COMMAND ...)."""

    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose (full lists)
    color: bool = True


SETTINGS = Settings()

FormatOpt = Annotated[OutputFormat, typer.Option(
    "--format", "-f", help="Output: table (people), json (schema lorafit.report/1), github (workflow annotations, as "
    "ruff's --output-format github), sarif (SARIF 2.1.0, for code scanning).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]


def output_format(fmt: OutputFormat | str, as_json: bool) -> str:
    return "json" if as_json else OutputFormat(fmt).value


class OneLineUsage(UsageError):
    """A usage error shown as one line on stderr: what is wrong, and where help is; with --json (or --format json)
    among the arguments, also the error as JSON on stdout."""

    as_json = False

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx else "lorafit"
        message = f"{self.format_message()} (see {command} -h)"
        typer.echo(f"lorafit: error: {message}", err=True)
        if self.as_json:
            from .report import error_json

            name = (self.ctx.info_name if self.ctx and self.ctx.parent else None) or "lorafit"
            sys.stdout.write(error_json(name, self, message, kind="UsageError") + "\n")


GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet", "--no-color")


class LorafitGroup(TyperGroup):
    """Typer's group, with every usage error (a missing argument, an unknown option or command) as one line."""

    def make_context(self, info_name: str | None, args: list[str], parent: Context | None = None,
                     **extra: Any) -> Context:
        if parent is None:  # -v/-q/--no-color are global; accept them anywhere on the line (lorafit check X -q)
            args = [a for a in args if a in GLOBAL_FLAGS] + [a for a in args if a not in GLOBAL_FLAGS]
            args = ray_address_optional(args)
        self.argv = list(args)  # the whole command line: a usage error in a subcommand reads --json from it
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as e:
            raise _one_line(e, args) from None

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise _one_line(e, getattr(self, "argv", [])) from None


def _one_line(e: UsageError, args: list[str]) -> UsageError:
    if type(e).__name__ == "NoArgsIsHelpError" or isinstance(e, OneLineUsage):  # `lorafit` alone prints the help
        return e
    one = OneLineUsage(e.format_message(), e.ctx)
    one.as_json = "--json" in args or any(a in ("--format=json", "-fjson") for a in args) or any(
        a in ("--format", "-f") and b == "json" for a, b in zip(args, args[1:], strict=False))
    return one


# What `--ray ADDRESS` takes as ADDRESS: Ray's "auto" and "local", HOST:PORT, ray://HOST:PORT.
_RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+")


def ray_address_optional(args: list[str]) -> list[str]:
    """`--ray [ADDRESS]`: the word after --ray is its ADDRESS only when it looks like one, so `scan --ray PATH` and
    `--ray --json` mean a local Ray instance (written `--ray=` for the parser, which would take any next word)."""
    out = list(args)
    if next((a for a in out if a not in GLOBAL_FLAGS), None) not in ("scan", "merge"):
        return out  # the commands that take --ray; elsewhere --ray stays as typed, for click's error
    for i, a in enumerate(out):
        if a == "--":
            break
        if a == "--ray" and not (i + 1 < len(out) and _RAY_ADDRESS.fullmatch(out[i + 1])):
            out[i] = "--ray="
    return out


def ray_cluster(address: str | None) -> Any:
    """The RayCluster `--ray [ADDRESS]` asks for (None: no --ray; "": a local instance)."""
    if address is None:
        return None
    from .api.distributed import RayCluster

    return RayCluster(address or None)


def usage_error(message: str) -> NoReturn:
    """Exit 2 with one line, as a usage error made by click would."""
    typer.echo(f"lorafit: error: {message}", err=True)
    raise typer.Exit(2)


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def emit(report: Any, fmt: str, show_modules: bool = False) -> None:
    """Print `report` in `fmt` and exit with its code."""
    print_report(report, fmt, show_modules)
    raise typer.Exit(report.exit_code)


def print_report(report: Any, fmt: str, show_modules: bool = False) -> None:
    """Print `report` in `fmt`."""
    if fmt == "json":
        sys.stdout.write(report.dumps() + "\n")
    elif fmt in ("github", "sarif"):
        from .ci_formats import github_annotations, sarif_log

        sys.stdout.write(github_annotations(report) if fmt == "github" else sarif_log(report))
    else:
        from .render import render

        render(report, show_modules=show_modules, verbosity=SETTINGS.verbosity, color=SETTINGS.color)


def _bad_input(e: BaseException, message: str, fmt: str, command: str) -> None:
    """One line on stderr and exit 2; with a machine format, the error as that format on stdout too."""
    from .render import printable

    typer.echo(f"lorafit: error: {printable(message)}", err=True)
    if fmt == "json":
        from .report import error_json

        sys.stdout.write(error_json(command, e, message) + "\n")
    raise typer.Exit(2) from None


def run_command(fn: Callable[[], Any], fmt: str, command: str, show_modules: bool = False) -> None:
    """Call the API and emit its report; a user error becomes one line on stderr and exit 2."""
    quiet_libraries()
    try:
        report = fn()
    except AdapterMismatchError as e:  # a LorafitError too, but a finding about the adapter (exit 1), not bad input
        from .report import Report

        if not isinstance(e.report, Report):
            typer.echo(f"lorafit: {e}", err=True)
            raise typer.Exit(1) from None
        report = e.report
    except LorafitError as e:
        _bad_input(e, str(e), fmt, command)
    except Exception as e:
        _unexpected(e, fmt, command)
    emit(report, fmt, show_modules)


def _unexpected(e: Exception, fmt: str, command: str) -> None:
    """A case no rule foresaw: still one line and exit 2, never a traceback; LORAFIT_DEBUG=1 shows it. Call it in
    an `except` block (it re-raises the exception being handled under LORAFIT_DEBUG)."""
    if os.environ.get("LORAFIT_DEBUG"):
        raise  # the exception of the except block this is called from
    first = (str(e).splitlines() or [""])[0][:300]
    _bad_input(e, f"unexpected {type(e).__name__}: {first} (LORAFIT_DEBUG=1 shows the traceback; please "
               "report it)", fmt, command)


def run_scan(paths: list[Any], base: str | None, class_name: str | None, runtimes: list[str], hf_cache: bool,
             out: Any, workers: int | None, fmt: str, ray: str | None = None) -> None:
    """lorafit scan: a progress bar, then the per-adapter table (or JSONL / github / sarif), REPORT_DIR if asked;
    with `ray` (--ray [ADDRESS]), the work runs as Ray tasks."""
    quiet_libraries()
    from .api.scan import ScanOptions, scan

    try:
        if runtimes:
            from .api.runtimes import parse_runtimes

            parse_runtimes(runtimes)  # an unknown runtime is a usage error before any work
        result = scan(paths, ScanOptions(base, class_name, runtimes), workers, hf_cache,
                      progress=_scan_progress() if fmt == "table" and sys.stderr.isatty() else None,
                      cluster=ray_cluster(ray))
        if out is not None:
            _write_scan(result, out)
    except LorafitError as e:
        _bad_input(e, str(e), fmt, "scan")
    except Exception as e:
        _unexpected(e, fmt, "scan")
    from .render import render_scan

    _print_records(result, fmt, render_scan)


def run_batch(manifest: Any, ray: str | None, fmt: str) -> None:
    """lorafit merge --batch: every merge of MANIFEST, here or on Ray; a row per entry (entry, status, out), or a
    record per entry (JSON lines, like scan's); exit 1 when any entry failed or was refused."""
    quiet_libraries()
    from .api.batch import merge_batch

    try:
        show = _scan_progress("lorafit merge --batch", "entries") if fmt == "table" and sys.stderr.isatty() else None
        result = merge_batch(manifest, ray_cluster(ray), progress=show)
    except LorafitError as e:
        _bad_input(e, str(e), fmt, "merge")
    except Exception as e:
        _unexpected(e, fmt, "merge")
    from .render import render_batch

    _print_records(result, fmt, render_batch)


def _print_records(result: Any, fmt: str, render_table: Callable[..., None]) -> None:
    """A scan's or a batch's records: JSON lines, CI annotations of their reports, or the table; exit with its code."""
    if fmt == "json":
        sys.stdout.write("".join(json.dumps(r, default=str) + "\n" for r in result.records))
    elif fmt in ("github", "sarif"):
        from .ci_formats import github_annotations, sarif_log

        reports = result.reports()
        sys.stdout.write("".join(github_annotations(r) for r in reports) if fmt == "github" else sarif_log(reports))
    else:
        render_table(result, color=SETTINGS.color)
    raise typer.Exit(result.exit_code)


def _scan_progress(what: str = "lorafit scan", unit: str = "adapters") -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{what}: {done}/{total} {unit}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _write_scan(result: Any, out: Any) -> None:
    from pathlib import Path

    from .fileio.outputs import OutputDir

    with OutputDir(Path(out)) as tmp:
        (tmp / "scan.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in result.records))
        (tmp / "summary.json").write_text(json.dumps(result.summary() | {"groups": result.groups}, indent=2) + "\n")
