#!/usr/bin/env python
"""Benchmark `lorafit check` on the real config.json of each family people fine-tune, against the stock route.

A script, never a test. For every bench/configs/*.json (real hub configs; bench/configs/SOURCES*.md says where
each comes from) it writes, in a work dir (default bench/work/families/, gitignored), a model directory holding
only that config.json, and an r=16 adapter on the attention projections of the class the family is fine-tuned
as (AutoModelForCausalLM, else AutoModelForSeq2SeqLM, else AutoModelForImageTextToText, else AutoModel), keyed
as PEFT saves it. Then, each job its own process (wall time and peak RSS from os.wait4, after an idle CPU):

  - lorafit check, cold: an empty tree cache. The tree comes from a shipped blueprint (no torch or transformers
    import) or, for a family without one, from a meta-device build. The table says which ("path").
  - lorafit check, warm: the same again, with the cache the cold run filled.
  - stock: what finding out takes without lorafit and without weights: import torch, transformers and PEFT,
    build the class on the meta device, get_peft_model with the adapter's config, set_peft_model_state_dict,
    and read its missing/unexpected keys.

Sizes: the 1B, 8B and 70B Llama configs and the 30B and 235B Qwen3-MoE configs show whether a check is flat
in model size.

    .venv/bin/python bench/bench_families.py [--work DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import PY, ROOT, ratio, run  # noqa: E402  (one job runner for every bench)

CONFIGS = ROOT / "bench" / "configs"
RESULTS = ROOT / "bench" / "results"
# Attention projections by the names the families give them; the adapter targets those the class has.
ATTENTION = ["q_proj", "v_proj", "query", "value", "query_proj", "value_proj", "c_attn", "q", "v", "query_key_value",
             "qkv_proj", "Wqkv", "q_b_proj", "kv_b_proj"]
CLASSES = [("AutoModelForCausalLM", "CAUSAL_LM"), ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
           ("AutoModelForImageTextToText", None), ("AutoModel", None)]
SIZES = {"dense": ["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b"], "moe": ["qwen3-30b-a3b", "qwen3-235b-a22b"]}
R = 16

# The stock route: PEFT on a meta-device model, asked what it would load.
STOCK = """
import json, sys, torch, transformers
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
model_dir, adapter, cls = sys.argv[1:4]
config = transformers.AutoConfig.from_pretrained(model_dir)
with torch.device("meta"):
    model = getattr(transformers, cls).from_config(config)
cfg = json.load(open(adapter + "/adapter_config.json"))
lc = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
pm = get_peft_model(model, lc)
result = set_peft_model_state_dict(pm, load_file(adapter + "/adapter_model.safetensors"), low_cpu_mem_usage=True)
print(json.dumps({"unexpected": len(result.unexpected_keys)}))
"""

# `lorafit check`, reporting which heavy libraries the process imported.
LORAFIT = """
import json, sys
from lorafit.cli import main
try:
    main()
finally:
    heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
    print(json.dumps({"heavy": heavy}), file=sys.stderr)
"""


def make_inputs(name: str, config: dict[str, Any], work: Path) -> dict[str, Any] | None:
    """The model dir and adapter for one config; None when no class of transformers builds it."""
    import torch
    from safetensors.torch import save_file

    model_dir, adapter = work / name / "model", work / name / "adapter"
    shutil.rmtree(work / name, ignore_errors=True)
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    picked = _pick_class(model_dir)
    if picked is None:
        return None
    cls, task, tree, targets = picked
    linear = [p for p, i in tree.modules.items() if i.lora_kind == "linear"]
    modules = [p for p in linear if any(p == t or p.endswith("." + t) for t in targets)]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for path in modules:
        info = tree.modules[path]
        assert info.in_features and info.out_features
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(R, info.in_features, generator=g).bfloat16()
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(info.out_features, R, generator=g).bfloat16()
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": task, "r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": str(model_dir)}, indent=2))
    return {"model": model_dir, "adapter": adapter, "class": cls, "modules": len(modules),
            "model_type": config.get("model_type")}


def _pick_class(model_dir: Path) -> tuple[str, str | None, Any, list[str]] | None:
    """The first of CLASSES the family has whose tree has attention projections: (class, task_type, tree, targets)."""
    from lorafit.targets.transformers.resolve import tree_from_pretrained

    for cls, task in CLASSES:
        try:
            tree = tree_from_pretrained(model_dir, cls)
        except Exception:
            continue
        linear = [p for p, i in tree.modules.items() if i.lora_kind == "linear"]
        targets = [t for t in ATTENTION if any(p == t or p.endswith("." + t) for p in linear)][:2]
        if targets:
            return cls, task, tree, targets
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "families")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--update", action="store_true", help="with --only: replace those rows of the last results")
    ap.add_argument("--setup", help=argparse.SUPPRESS)  # internal: write the inputs and their manifest here
    args = ap.parse_args()
    os.environ["LORAFIT_NO_CACHE"] = "1"  # setting up the inputs must not fill the user's tree cache
    names = sorted(p.stem for p in CONFIGS.glob("*.json"))
    if args.only:
        names = [n for n in names if n in args.only]
    if args.setup:
        made = {n: make_inputs(n, json.loads((CONFIGS / f"{n}.json").read_text()), args.work) for n in names}
        Path(args.setup).write_text(json.dumps(made, default=str))
        return
    # The inputs are made in a child: this process stays small, since a child it forks starts its peak RSS
    # (what wait4 reports) at this process's size.
    manifest = args.work / "inputs.json"
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, __file__, "--work", str(args.work), "--setup", str(manifest), *(
        ["--only", *args.only] if args.only else [])], check=True)
    made = json.loads(manifest.read_text())
    rows: list[dict[str, Any]] = []
    for name in names:
        inputs = made.get(name)
        if inputs is None:
            print(f"{name}: no class builds it, skipped", flush=True)
            continue
        print(f"{name} ({inputs['model_type']}, {inputs['class']}, {inputs['modules']} modules)", flush=True)
        cache = args.work / name / "cache"
        check = [PY, "-c", LORAFIT, "check", str(inputs["adapter"]), "--base", str(inputs["model"]), "--class",
                 inputs["class"], "--json"]
        cold = run(check, f"{name}: lorafit check (cold)", cache=cache, cold=True)
        warm = run(check, f"{name}: lorafit check (warm)", cache=cache)
        stock = run([PY, "-c", STOCK, str(inputs["model"]), str(inputs["adapter"]), inputs["class"]],
                    f"{name}: stock (meta build + PEFT)")
        report = json.loads(cold["stdout"] or "{}")
        rows.append({"name": name, "model_type": inputs["model_type"], "class": inputs["class"],
                     "modules": inputs["modules"], "path": (report.get("target") or {}).get("tree_from"),
                     "ok": report.get("ok"), "cold": _job(cold), "warm": _job(warm), "stock": _job(stock)})
    RESULTS.mkdir(exist_ok=True)
    if args.update and (RESULTS / "families.json").exists():
        fresh = {r["name"] for r in rows}
        old = [r for r in json.loads((RESULTS / "families.json").read_text()) if r["name"] not in fresh]
        rows = sorted(old + rows, key=lambda r: r["name"])
    (RESULTS / "families.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "families.md").write_text(render(rows))
    print(f"wrote {RESULTS / 'families.md'}")


def _job(row: dict[str, Any]) -> dict[str, Any]:
    heavy = []
    for line in reversed(row.get("stderr", "").splitlines()):
        if line.startswith('{"heavy"'):
            heavy = json.loads(line)["heavy"]
            break
    return {"wall_s": row["wall_s"], "peak_rss_mb": row["peak_rss_mb"], "exit": row["exit"], "heavy": heavy}


def render(rows: list[dict[str, Any]]) -> str:
    day = datetime.date.today().isoformat()
    lines = [
        "# lorafit check on real configs, by family", "",
        f"{day}, {platform.machine()}, Python {platform.python_version()}. One real hub config.json per family "
        "(bench/configs/, sources in SOURCES*.md), no weights; an r=16 adapter on two attention projections of "
        "the class named. Each job is its own process; wall time and peak RSS from wait4, after an idle CPU. "
        "Cold: empty tree cache (path = where the tree came from: blueprint, no torch or transformers import; "
        "meta, a meta-device build). Warm: the cache filled. Stock: torch + transformers + PEFT, the class on "
        "the meta device, get_peft_model and set_peft_model_state_dict.", "",
        "| config | model_type | class | path | cold (s) | cold (MB) | imports | warm (s) | stock (s) | stock (MB) "
        "| cold vs stock |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        c, w, s = r["cold"], r["warm"], r["stock"]
        lines.append(f"| {r['name']} | {r['model_type']} | {r['class']} | {r['path']} | {c['wall_s']} | "
                     f"{c['peak_rss_mb']} | {', '.join(c['heavy']) or 'none'} | {w['wall_s']} | {s['wall_s']} | "
                     f"{s['peak_rss_mb']} | {ratio(s['wall_s'], c['wall_s'])} faster |")
    by_name = {r["name"]: r for r in rows}
    lines += ["", "## Flat in size", "", "| family | config | cold (s) | warm (s) | vs the smallest |",
              "|---|---|---:|---:|---:|"]
    for family, names in SIZES.items():
        have = [by_name[n] for n in names if n in by_name]
        for r in have:
            lines.append(f"| {family} | {r['name']} | {r['cold']['wall_s']} | {r['warm']['wall_s']} | "
                         f"{ratio(r['cold']['wall_s'], have[0]['cold']['wall_s'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
