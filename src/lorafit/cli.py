"""The `lorafit` command: thin. Parse, call the API, render, exit.

Exit codes, decided here only: 0 no error finding, 1 an error finding, 2 bad input or usage.
torch, transformers and peft are imported inside the commands that need them, so `--help` is instant.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_options import (
    TREE_ENV,
    AdapterArg,
    BaseOpt,
    ClassOpt,
    ConfigOpt,
    FollowOpt,
    MapOpt,
    RayOpt,
    RevisionOpt,
    RuntimeOpt,
)
from .cli_output import (
    SETTINGS,
    FormatOpt,
    JsonOpt,
    LorafitGroup,
    OutputFormat,
    output_format,
    quiet_libraries,
    run_command,
    usage_error,
)

STARTED = time.time()  # when the command started, as near as lorafit can tell (the demo reports the whole time)

app = typer.Typer(
    cls=LorafitGroup, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Make sure a LoRA adapter really lands on the model it is loaded into.\n\n"
         "Exit codes: 0 clean, 1 an error finding, 2 bad input or usage. Nothing is ever downloaded.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from .version import __version__

        libs = ", ".join(f"{p} {version(p)}" for p in ("peft", "transformers", "torch"))
        typer.echo(f"lorafit {__version__} ({libs})")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print lorafit's version and the library versions it sees.")]
          = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every key of a finding, not the "
                                                "first few.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only the findings and the verdict.")]
          = False,
          no_color: Annotated[bool, typer.Option("--no-color", help="No colors (NO_COLOR=1 does the same).")]
          = False) -> None:
    """Make sure a LoRA adapter really lands on the model it is loaded into."""
    SETTINGS.verbosity = 1 if verbose else -1 if quiet else 0
    SETTINGS.color = not no_color and not os.environ.get("NO_COLOR")


def _quiet_transformers() -> None:
    """transformers' load report and progress bar: lorafit's report says what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command()
def inspect(adapter: AdapterArg, as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table,
            modules: Annotated[bool, typer.Option("--modules/--no-modules",
                                                  help="Show the per-module table.")] = True,
            manifest: Annotated[Path | None, typer.Option(
                "--manifest", help="Also write the SHA-256 of every file of the adapter to this JSON file, for "
                "`lorafit verify-files ADAPTER --manifest FILE` later.")] = None) -> None:
    """What an adapter holds, and whether it is healthy (rank, alpha, scaling, coverage, zeros, NaN)."""
    from .api.check import inspect as run

    run_command(lambda: run(adapter, manifest=manifest), output_format(fmt, as_json), "inspect", show_modules=modules)


@app.command("verify-files")
def verify_files(directory: Annotated[Path, typer.Argument(help="The directory to check (an adapter, or an output "
                                                           "of fix, merge or convert).")],
                 manifest: Annotated[Path | None, typer.Option(
                     "--manifest", help="The manifest to check against. Default: DIRECTORY/lorafit-manifest.json, "
                     "which fix, merge and convert write.")] = None,
                 as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Check every file of DIRECTORY against its SHA-256 manifest: changed, missing and unlisted files."""
    from .api.manifest import verify_files as run

    run_command(lambda: run(directory, manifest), output_format(fmt, as_json), "verify-files")


@app.command(epilog=TREE_ENV)
def check(adapter: AdapterArg, base: BaseOpt = None, revision: RevisionOpt = None, config: ConfigOpt = None,
          class_name: ClassOpt = None, key_mapping: MapOpt = None,
          runtime: RuntimeOpt = None,
          max_lora_rank: Annotated[int | None, typer.Option(
              "--max-lora-rank", min=1, help="vLLM / SGLang: the server's --max-lora-rank (vLLM default 16).")] = None,
          lora_target_modules: Annotated[str | None, typer.Option(
              "--lora-target-modules", help="SGLang: the server's --lora-target-modules, comma-separated.")] = None,
          tower_lora: Annotated[bool, typer.Option(
              "--enable-tower-connector-lora", help="vLLM: the server runs with LoRA on the vision tower and "
              "connector.")] = False,
          as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Will ADAPTER land on BASE loaded with --class, or on each --runtime? Reads config and headers, no weights."""
    if not runtime:
        from .api.check import check as run

        run_command(lambda: run(adapter, base, class_name, key_mapping, revision, config),
                    output_format(fmt, as_json), "check")
        return
    settings = {"max_lora_rank": max_lora_rank, "enable_tower_connector_lora": tower_lora or None,
                "lora_target_modules": lora_target_modules.split(",") if lora_target_modules else None}

    def run_runtimes() -> Any:
        from .api.runtimes import check_runtimes

        return check_runtimes(adapter, runtime, base, class_name, key_mapping, settings, revision, config)

    run_command(run_runtimes, output_format(fmt, as_json), "check")


@app.command(epilog=TREE_ENV)
def fix(adapter: AdapterArg,
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the fixed adapter to.")],
        base: BaseOpt = None, revision: RevisionOpt = None, config: ConfigOpt = None, class_name: ClassOpt = None,
        key_mapping: MapOpt = None,
        force: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace OUT if it exists, atomically once "
                                            "the new output is complete.")] = False,
        follow_symlinks: FollowOpt = False, as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Write a copy of ADAPTER that stock PEFT loads completely on BASE with --class.

    Tensors are copied bit for bit under remapped keys; the input is never modified; OUT appears only
    when complete. If the adapter cannot be made to land, nothing is written and the exit code is 1.
    """
    from .api.fix import fix as run

    run_command(lambda: run(adapter, base, out, class_name=class_name, key_mapping=key_mapping, force=force,
                            revision=revision, config_overrides=config,
                     follow_symlinks=follow_symlinks), output_format(fmt, as_json), "fix")


@app.command()
def verify(adapter: AdapterArg, base: BaseOpt = None, revision: RevisionOpt = None, config: ConfigOpt = None,
           class_name: ClassOpt = None,
           probe: Annotated[bool, typer.Option("--probe", help="Also check each adapted module's output "
                                               "changes on a random input.")] = False,
           lorafit_load: Annotated[bool, typer.Option("--lorafit-load/--stock-load", help="Load with "
                                                      "lorafit.load_adapter (aligned) or with stock "
                                                      "PeftModel.from_pretrained.")] = False,
           as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Load BASE with --class and ADAPTER on top (stock PEFT by default), then prove the load bit for bit."""

    def run() -> Any:
        from .api.load import verify_pretrained

        _quiet_transformers()
        return verify_pretrained(adapter, base, class_name, probe=probe, lorafit_load=lorafit_load, revision=revision,
                                 config_overrides=config)

    run_command(run, output_format(fmt, as_json), "verify")


@app.command()
def demo(keep: Annotated[Path | None, typer.Option(help="Keep the demo's files in this directory.")] = None,
         as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Train a tiny Llama adapter, break it the usual way, diagnose it and fix it. No download, < 1 min."""
    quiet_libraries()
    _quiet_transformers()
    from .demo import run_demo

    out = output_format(fmt, as_json)
    code, diagnosis = run_demo(keep, started=STARTED, quiet=out != "table")
    if out != "table":  # the story's diagnosis (step 3) in that format; the exit code is still the story's
        from .cli_output import print_report

        print_report(diagnosis, out)
    raise typer.Exit(code)


@app.command(epilog=TREE_ENV)
def merge(ctx: typer.Context, adapter: Annotated[str | None, typer.Argument(
              help="Adapter directory (adapter_config.json + weights), a parent holding one adapter, or a hub id in "
              "the local HF cache. Not with --batch.")] = None,
          out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory to write the merged model to.")]
          = None,
          base: BaseOpt = None, revision: RevisionOpt = None, config: ConfigOpt = None,
          class_name: Annotated[str | None, typer.Option(
              "--class", "-c", help="The class the adapter is aligned against. Default: the class the base "
              "checkpoint was saved with (config.json architectures).")] = None,
          key_mapping: MapOpt = None,
          dtype: Annotated[str | None, typer.Option("--dtype", help="Cast the base first, as from_pretrained(dtype=D) "
                                                    "would: float32, float16, bfloat16. Default: keep it.")] = None,
          safe_merge: Annotated[bool, typer.Option("--safe-merge", help="Follow merge_and_unload(safe_merge=True): "
                                                   "round ΔW to the weight dtype first, refuse NaN.")] = False,
          max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, "
                                                      "2GiB, 500MB.")] = "5GB",
          workers: Annotated[int, typer.Option("--workers", min=1, help="Tensors merged at once (threads); "
                                               "memory grows with each.")] = 2,
          force: Annotated[bool, typer.Option("--force", help="Merge even when check reports errors (the "
                                              "findings are kept in the report).")] = False,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists, atomically once "
                                                  "the new model is complete.")] = False,
          follow_symlinks: FollowOpt = False,
          batch: Annotated[Path | None, typer.Option(
              "--batch", metavar="MANIFEST", help="Run every merge listed in MANIFEST (JSON lines or a JSON list of "
              "{\"adapter\", \"out\", \"base\", \"class\", ...}; docs/distributed.md), one after another or "
              "with --ray as Ray tasks. A row per entry; exit 1 if any failed.")] = None,
          ray: RayOpt = None,
          as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Merge ADAPTER into BASE and write a full model to OUT, bit-identical to PEFT's merge_and_unload().

    Streams the base tensor by tensor (memory: about one tensor per worker plus the adapter). Refuses, with
    exit code 1, when check finds an error; OUT appears only when complete. --batch MANIFEST runs many merges,
    here or with --ray on a Ray cluster, a row each.
    """
    if batch is not None:
        # what the command line set, whatever the defaults are: each merge's options come from MANIFEST
        given = [p.opts[0] if p.param_type_name == "option" else (p.name or "").upper() for p in ctx.command.params
                 if p.name not in (None, "batch", "ray", "as_json", "fmt")
                 and getattr(ctx.get_parameter_source(p.name or ""), "name", "") == "COMMANDLINE"]
        if given:
            usage_error(f"merge --batch takes each merge's adapter, out and options from MANIFEST, not {given[0]}")
        from .cli_output import run_batch

        run_batch(batch, ray, output_format(fmt, as_json))
        return
    if ray is not None:
        usage_error("--ray runs the merges of a --batch MANIFEST; one merge runs here")
    if adapter is None or out is None:
        usage_error("merge needs ADAPTER and --out (or --batch MANIFEST)")
    from .api.merge import merge as run

    progress = not as_json and sys.stderr.isatty()
    one, into = adapter, out  # narrowed, for the lambda
    run_command(lambda: run(one, base, into, class_name=class_name, key_mapping=key_mapping, dtype=dtype,
                     safe_merge=safe_merge, max_shard_size=max_shard_size, force=force, workers=workers,
                     progress=progress, follow_symlinks=follow_symlinks, overwrite=overwrite, revision=revision,
                     config_overrides=config),
                output_format(fmt, as_json), "merge")


@app.command()
def convert(adapter: AdapterArg,
            to: Annotated[str, typer.Option("--to", "-t", help="Target format: mlx (mlx-lm), gguf (llama.cpp, "
                                            "Ollama) or peft (from mlx-lm).")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Where to write: a directory (mlx, peft) or a "
                                              ".gguf file.")],
            base: Annotated[str | None, typer.Option(
                "--base", "-b", help="Base model (local dir or cached hub id). Needed for gguf (tensor names, "
                "llama.cpp's q/k row order), and for mlx when layers_to_transform leaves the top layers out.")]
            = None,
            force: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace OUT if it exists, "
                                                "atomically once the new output is complete.")] = False,
            as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Write ADAPTER in another format, exactly (PEFT -> mlx-lm or GGUF, mlx-lm -> PEFT), or refuse and write nothing.

    Scales from use_rslora or alpha_pattern are folded into lora_b, smaller ranks zero-padded; OUT appears
    only when complete.
    """
    from .api.convert import convert as run

    run_command(lambda: run(adapter, to, out, base=base, force=force), output_format(fmt, as_json), "convert")


@app.command("verify-merge")
def verify_merge(merged: Annotated[str, typer.Argument(help="Directory of the merged safetensors checkpoint.")],
                 adapter: Annotated[str, typer.Option("--adapter", "-a", help="The adapter that was merged.")],
                 base: BaseOpt = None, revision: RevisionOpt = None,
                 class_name: Annotated[str | None, typer.Option(
                     "--class", "-c", help="As for merge: default, the class the base was saved with.")] = None,
                 key_mapping: MapOpt = None, as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Prove MERGED == BASE + ADAPTER: adapted weights within dtype rounding, every other tensor bit-identical."""
    from .api.verify_merge import verify_merge as run

    run_command(lambda: run(merged, base, adapter, class_name=class_name, key_mapping=key_mapping, revision=revision),
                output_format(fmt, as_json), "verify-merge")


@app.command(epilog=TREE_ENV)
def scan(paths: Annotated[list[Path] | None, typer.Argument(help="Directories to search for adapters (adapter_config"
                                                             ".json or adapters.safetensors), recursively.")] = None,
         base: Annotated[str | None, typer.Option(
             "--base", "-b", help="Judge every adapter on this base. Default: the base each adapter names; adapters "
             "are grouped by base, one module tree each.")] = None,
         class_name: ClassOpt = None, runtime: RuntimeOpt = None,
         hf_cache: Annotated[bool, typer.Option("--hf-cache", help="Also scan the adapters in the local HF cache.")]
         = False,
         out: Annotated[Path | None, typer.Option(
             "--out", "-o", help="Write REPORT_DIR/scan.jsonl (one check --json record per adapter) and "
             "summary.json.")] = None,
         workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes (default: one per core); "
                                                     "with --ray, chunks per base (default: one per cluster CPU).")]
         = None,
         ray: RayOpt = None,
         as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Vet a fleet: every adapter under PATHS, on its base and --runtime, in parallel; results cached by content.

    Exit codes: 0 all clean, 1 any adapter with an error finding or unreadable (a row, the scan goes on), 2 usage.
    """
    from .cli_output import run_scan

    if not paths and not hf_cache:
        usage_error("scan needs PATHS, or --hf-cache")
    run_scan(list(paths or []), base, class_name, list(runtime or []), hf_cache, out, workers,
             output_format(fmt, as_json), ray)


@app.command(epilog=TREE_ENV)
def report(path: Annotated[str, typer.Argument(help="An adapter directory (or cached hub id), or a scan's REPORT_DIR "
                                               "(lorafit scan -o REPORT_DIR).")],
           out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write (self-contained: it needs "
                                             "no network to view).")],
           base: BaseOpt = None, revision: RevisionOpt = None, class_name: ClassOpt = None,
           force: Annotated[bool, typer.Option("--overwrite", "--force", help="Replace OUT if it exists, "
                                               "atomically once the new page is complete.")] = False,
           as_json: JsonOpt = False, fmt: FormatOpt = OutputFormat.table) -> None:
    """Draw an adapter (where each module lands, ‖scale·B·A‖ per module, rank and alpha, findings) or a scan (the
    verdict matrix, adapters by base and by finding) as one HTML page.

    Needs matplotlib: pip install 'lorafit[report]'. Exit codes: as check for an adapter (1 on an error finding);
    0 for a scan's page once written; 2 for bad input.
    """
    from .api.report_page import report_html

    run_command(lambda: report_html(path, out, base, class_name, revision, force), output_format(fmt, as_json),
                "report")


class Terminated(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so that outputs in progress are removed as on Ctrl-C.

    A BaseException, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


def _on_signal(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main() -> None:
    """Entry point; usage errors exit 2 (click's convention), everything else as documented above.

    SIGINT, SIGTERM (timeout, systemd, Kubernetes) and SIGHUP unwind the command alike, so a partial output
    is removed; the process then exits 128 + the signal number, as a shell reports a signal.
    """
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        app()
    except Terminated as e:
        sys.stderr.write(f"lorafit: stopped by {signal.Signals(e.signum).name}; no partial output was left behind\n")
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
