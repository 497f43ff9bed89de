"""The options several `lorafit` commands share, with their help text (one definition, one wording)."""

from __future__ import annotations

from typing import Annotated

import typer

ClassOpt = Annotated[str | None, typer.Option(
    "--class", "-c", help="The class you load the base with: an Auto class (AutoModel, AutoModelForCausalLM, "
    "AutoModelForSequenceClassification, ...) or a concrete one (LlamaModel). Default: what task_type implies.")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", "-b", help="Base model: a local directory, or a hub id in the local HF cache. Default: the base the "
    "adapter names (base_model_name_or_path); the report says which.")]
ConfigOpt = Annotated[list[str] | None, typer.Option(
    "--config", help="A config kwarg you load the base with, KEY=VALUE (repeatable), as from_pretrained(base, "
    "num_labels=3): --config num_labels=3.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="Branch, tag or commit of the base's hub snapshot in the HF cache (JSON: target.snapshot).")]
MapOpt = Annotated[list[str] | None, typer.Option(
    "--key-mapping", "-k", help="Rewrite module paths with a regex, REGEX=REPLACEMENT (repeatable, first match "
    "wins), like PEFT's key_mapping. Overrides the automatic layout search.")]
FollowOpt = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Also read files that are symlinks out of the adapter or base directory. By default "
    "they are refused, since their content would be copied into OUT.")]
AdapterArg = Annotated[str, typer.Argument(help="Adapter directory (adapter_config.json + weights), a parent "
                                           "holding one adapter, or a hub id in the local HF cache.")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", help="Run the work as Ray tasks: on a local Ray instance, or on the cluster at "
    "ADDRESS (auto, HOST:PORT, ray://HOST:10001; write --ray=ADDRESS for anything else). Every path must be the "
    "same on every node. Needs pip install 'lorafit[ray]'; see docs/distributed.md.")]

TREE_ENV = ("The model's module tree comes from a cache, a shipped blueprint, or a meta-device build "
             "(--json: target.tree_from). Environment: LORAFIT_CACHE=DIR, LORAFIT_NO_CACHE=1, "
             "LORAFIT_NO_BLUEPRINTS=1, LORAFIT_DEBUG=1 (tracebacks).")


RuntimeOpt = Annotated[list[str] | None, typer.Option(
    "--runtime", "-r", help="Where the adapter will run: transformers (default), vllm, sglang, llama.cpp, ollama, "
    "lorax, mlx; optionally @RELEASE (vllm@0.8.3). Repeatable, or comma-separated: one verdict per runtime. "
    "Serving runtimes need no --base; with one, they also judge where the adapter's paths land in it.")]
