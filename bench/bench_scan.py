#!/usr/bin/env python
"""Benchmark `lorafit scan` against the stock way of vetting adapters, on 1B-Llama-shaped r=16 adapters.

A script, never a test. In a work dir (default bench/work/, gitignored) it writes, once:
  - config-1b: a LlamaForCausalLM config of the 1B shape (hidden 2048, 16 layers, intermediate 8192, GQA 32/8),
    and base-1b with its weights (bf16, random) for the stock route;
  - fleet-N: N copies of an r=16 bf16 adapter on every linear layer (~22 MB each), as separate directories.
Then it times, as subprocesses (bench_merge.run: best of the runs, after the machine is idle):
  - `lorafit scan fleet-N --base config-1b --json` with the module tree cached and an empty scan cache (cold), and
    again with the scan cache filled (a re-run: every result comes from the cache);
  - the stock way per adapter: the base loaded once, then PeftModel.from_pretrained and a count of the loaded
    LoRA tensors for each of a few adapters (the per-adapter time is the slope, the base load left out).

    .venv/bin/python bench/bench_scan.py [--sizes 50,200] [--stock 5] [--work DIR]
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
from bench_merge import PY, ROOT, llama_config, run, write_adapter, write_base  # noqa: E402

STOCK = """
import sys, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel, get_peft_model_state_dict
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t0 = time.perf_counter()
for i, path in enumerate(sys.argv[2:]):
    pm = PeftModel.from_pretrained(model, path, adapter_name=f"a{i}")
    loaded = len(get_peft_model_state_dict(pm, adapter_name=f"a{i}"))
    model = pm.unload()  # back to the base for the next adapter, as a vetting loop must
    assert loaded > 0
print((time.perf_counter() - t0) / (len(sys.argv) - 2))
"""


def setup(work: Path, sizes: list[int]) -> None:
    config = work / "config-1b"
    if not config.exists():
        config.mkdir(parents=True)
        (config / "config.json").write_text(json.dumps(llama_config("1b"), indent=2) + "\n")
    if not (work / "base-1b").exists():
        write_base(work / "base-1b")
    one = work / "adapter-1b-bf16"
    if not one.exists():
        write_adapter(one, "1b", str(config), dtype="bfloat16")
    for n in sizes:
        fleet = work / f"fleet-{n}"
        if fleet.exists() and len(list(fleet.iterdir())) == n:
            continue
        shutil.rmtree(fleet, ignore_errors=True)
        fleet.mkdir()
        for i in range(n):
            shutil.copytree(one, fleet / f"adapter-{i:04d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--sizes", default="50,200")
    ap.add_argument("--stock", type=int, default=5, help="adapters the stock route loads (the slope is per adapter)")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work
    if args.setup_only:
        setup(work, sizes)
        return
    # Inputs are written by a child: a job forked from a parent that held the 2 GB base would report its RSS.
    subprocess.run([PY, __file__, "--work", str(work), "--sizes", args.sizes, "--setup-only"], check=True)
    cache = work / "scan-cache"
    lorafit = str(Path(PY).with_name("lorafit"))
    rows: dict[str, Any] = {}
    # the module tree cached first: the first check of the base writes it
    run([lorafit, "check", str(work / "adapter-1b-bf16"), "--base", str(work / "config-1b")], "warm the tree cache",
        cache=cache)
    for n in sizes:
        fleet = work / f"fleet-{n}"
        cmd = [lorafit, "scan", str(fleet), "--base", str(work / "config-1b"), "--json"]
        cold = run(cmd, f"lorafit scan {n} adapters (scan cache empty)", cache=cache,
                   before=lambda: shutil.rmtree(cache / "scan", ignore_errors=True), repeat=2)
        warm = run(cmd, f"lorafit scan {n} adapters (re-run, all cached)", cache=cache, repeat=2)
        rows[f"scan-{n}"] = {"adapters": n, "cold_s": cold["wall_s"], "rerun_s": warm["wall_s"],
                             "per_adapter_ms": round(1000 * cold["wall_s"] / n, 2),
                             "adapters_per_s": round(n / cold["wall_s"], 1), "peak_rss_mb": cold["peak_rss_mb"]}
    fleet = work / f"fleet-{sizes[0]}"
    paths = [str(p) for p in sorted(fleet.iterdir())[: args.stock]]
    stock = run([PY, "-c", STOCK, str(work / "base-1b"), *paths], f"stock: PeftModel.from_pretrained x{args.stock}")
    per_stock = float(stock["stdout"].strip().splitlines()[-1])
    rows["stock"] = {"per_adapter_s": round(per_stock, 3), "peak_rss_mb": stock["peak_rss_mb"]}
    best = max(rows[f"scan-{n}"]["adapters_per_s"] for n in sizes)
    for n in sizes:
        rows[f"scan-{n}"]["faster_than_stock"] = round(per_stock / (rows[f"scan-{n}"]["per_adapter_ms"] / 1000), 1)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "rows": rows, "best_adapters_per_s": best}
    out = ROOT / "bench" / "results"
    (out / "scan.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# lorafit scan, {result['date']} ({result['machine']})", "",
             "| adapters | scan, cold (s) | adapters/s | ms per adapter | re-run, cached (s) | vs stock per adapter |"
             " peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        r = rows[f"scan-{n}"]
        lines.append(f"| {n} | {r['cold_s']} | {r['adapters_per_s']} | {r['per_adapter_ms']} | {r['rerun_s']} | "
                     f"{r['faster_than_stock']}x faster | {r['peak_rss_mb']} |")
    lines += ["", f"Stock route: base loaded once, then PeftModel.from_pretrained + count per adapter: "
              f"{rows['stock']['per_adapter_s']} s per adapter."]
    (out / "scan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
