#!/usr/bin/env python
"""Benchmark `lorafit scan` against the stock way of vetting adapters, on 1B-Llama-shaped r=16 adapters.

A script, never a test. In a work dir (default bench/work/, gitignored) it writes, once:
  - config-1b: a LlamaForCausalLM config of the 1B shape (hidden 2048, 16 layers, intermediate 8192, GQA 32/8),
    and base-1b with its weights (bf16, random) for the stock route;
  - fleet-N: N copies of an r=16 bf16 adapter on every linear layer (~22 MB each), as separate directories.
Then it times, as subprocesses (bench_merge.run: best of the runs, after the machine is idle):
  - `lorafit scan fleet-N --base config-1b --json` with the module tree cached and an empty scan cache (cold), and
    again with the scan cache filled (a re-run: every result comes from the cache);
  - the cost per adapter as the fleet grows: cold scans of fleets of r=8 adapters (--curve, default 50,200,1000);
  - the stock way per adapter: the base loaded once, then PeftModel.from_pretrained and a count of the loaded
    LoRA tensors for each of a few adapters (the per-adapter time is the slope, the base load left out);
  - with --ray (needs `pip install 'lorafit[ray]'`), `scan --ray` on a local Ray instance at the largest size
    against the local parallel scan, both through the API in a fresh process with the scan cache emptied: Ray's
    own start-up (ray.init) and shutdown apart from the scan, the first scan on the new instance (its workers
    start then) and a second one (workers warm); and the CLI's `scan --ray` end to end.

    .venv/bin/python bench/bench_scan.py [--sizes 50,200] [--stock 5] [--work DIR] [--ray]
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


# One process: two local scans (a process pool, as `lorafit scan` runs), or ray.init, two Ray scans and the
# shutdown, each timed apart. Prints the times and a hash of the records (identical runs, identical hashes).
RAY_VS_LOCAL = """
import hashlib, json, shutil, sys, time
from pathlib import Path
from lorafit.api.scan import ScanOptions, scan
fleet, config, cache, mode = sys.argv[1:5]
out, cluster = {}, None
if mode == "ray":
    import logging, ray
    from lorafit.api.distributed import RayCluster, forwarded_env
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": forwarded_env()})  # as `lorafit scan --ray` starts it
    out["startup_s"] = time.perf_counter() - t0
    cluster = RayCluster()
out["scan_s"], hashes = [], set()
for _ in range(2):
    shutil.rmtree(Path(cache) / "scan", ignore_errors=True)
    t0 = time.perf_counter()
    result = scan([fleet], ScanOptions(base=config), cluster=cluster)
    out["scan_s"].append(time.perf_counter() - t0)
    assert result.cached == 0 and len(result.records) > 0
    hashes.add(hashlib.sha256(json.dumps(result.records, sort_keys=True, default=str).encode()).hexdigest())
out["records_sha256"] = hashes.pop() if len(hashes) == 1 else "differs between runs"
if mode == "ray":
    t0 = time.perf_counter()
    ray.shutdown()
    out["shutdown_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def bench_ray(work: Path, n: int, cache: Path, lorafit: str) -> dict[str, Any]:
    """scan --ray on a local Ray instance vs the local parallel scan, n adapters (RAY_VS_LOCAL, then the CLI)."""
    fleet, config = str(work / f"fleet-{n}"), str(work / "config-1b")
    local = run([PY, "-c", RAY_VS_LOCAL, fleet, config, str(cache), "local"], f"API scan {n} adapters, local x2",
                cache=cache)
    on_ray = run([PY, "-c", RAY_VS_LOCAL, fleet, config, str(cache), "ray"], f"API ray.init + scan {n} on Ray x2",
                 cache=cache)
    here, there = json.loads(local["stdout"].splitlines()[-1]), json.loads(on_ray["stdout"].splitlines()[-1])
    cli = run([lorafit, "scan", fleet, "--base", config, "--json", "--ray"], f"lorafit scan {n} --ray (CLI, all in)",
              cache=cache, before=lambda: shutil.rmtree(cache / "scan", ignore_errors=True), repeat=2)
    best_local = min(here["scan_s"])
    row = {"adapters": n, "cpus": os.cpu_count(), "local_scan_s": round(best_local, 2),
           "ray_startup_s": round(there["startup_s"], 2), "ray_scan_s": round(there["scan_s"][0], 2),
           "ray_scan_warm_s": round(there["scan_s"][1], 2), "ray_shutdown_s": round(there["shutdown_s"], 2),
           "ratio": round(there["scan_s"][0] / best_local, 2), "ratio_warm": round(there["scan_s"][1] / best_local, 2),
           "cli_ray_wall_s": cli["wall_s"], "cli_ray_peak_rss_mb": cli["peak_rss_mb"],
           "records_identical": here["records_sha256"] == there["records_sha256"]}
    print(f"  ray: {row}", flush=True)
    return row


def ray_lines(ray: dict[str, Any], local_cli_s: float | None) -> list[str]:
    """The markdown of the Ray measurement."""
    cli_local = f" (local `lorafit scan`: {local_cli_s} s)" if local_cli_s is not None else ""
    return ["", f"## scan --ray, local Ray instance ({ray['cpus']} CPUs), {ray['adapters']} adapters, "
            f"{ray.get('date', '')}".rstrip(", "), "",
            "| | seconds |", "|---|---|",
            f"| local parallel scan (process pool, API) | {ray['local_scan_s']} |",
            f"| Ray start-up (`ray.init`, apart) | {ray['ray_startup_s']} |",
            f"| scan on Ray, first on the new instance (workers start) | {ray['ray_scan_s']} |",
            f"| scan on Ray, second (workers warm) | {ray['ray_scan_warm_s']} |",
            f"| Ray shutdown (apart) | {ray['ray_shutdown_s']} |",
            f"| `lorafit scan --ray`, end to end (start, scan, stop) | {ray['cli_ray_wall_s']} |", "",
            f"Ray scan / local scan: {ray['ratio']}x (first), {ray['ratio_warm']}x (warm workers); target <= 1.5x. "
            f"Records identical to the local run: {'yes' if ray['records_identical'] else 'NO'}. The CLI end to end "
            f"includes Ray's start and stop{cli_local}."]


def setup(work: Path, sizes: list[int], curve: list[int]) -> None:
    config = work / "config-1b"
    if not config.exists():
        config.mkdir(parents=True)
        (config / "config.json").write_text(json.dumps(llama_config("1b"), indent=2) + "\n")
    if not (work / "base-1b").exists():
        write_base(work / "base-1b")
    one = work / "adapter-1b-bf16"
    if not one.exists():
        write_adapter(one, "1b", str(config), dtype="bfloat16")
    small = work / "adapter-1b-r8"
    if curve and not small.exists():
        write_adapter(small, "1b", str(config), r=8, dtype="bfloat16")
    for adapter, name, counts in ((one, "fleet", sizes), (small, "fleet-r8", curve)):
        for n in counts:
            fleet = work / f"{name}-{n}"
            if fleet.exists() and len(list(fleet.iterdir())) == n:
                continue
            shutil.rmtree(fleet, ignore_errors=True)
            fleet.mkdir()
            for i in range(n):
                shutil.copytree(adapter, fleet / f"adapter-{i:04d}")


def scan_row(n: int, cold: dict[str, Any]) -> dict[str, Any]:
    """A cold scan of n adapters: its time, per adapter and per second, and its peak RSS."""
    return {"adapters": n, "cold_s": cold["wall_s"], "per_adapter_ms": round(1000 * cold["wall_s"] / n, 2),
            "adapters_per_s": round(n / cold["wall_s"], 1), "peak_rss_mb": cold["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--sizes", default="50,200")
    ap.add_argument("--curve", default="50,200,1000",
                    help="fleet sizes of r=8 adapters (11 MB each) for the cost-per-adapter curve ('' to skip)")
    ap.add_argument("--stock", type=int, default=5, help="adapters the stock route loads (the slope is per adapter)")
    ap.add_argument("--ray", action="store_true", help="also measure scan --ray on a local Ray instance")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    curve = [int(s) for s in args.curve.split(",") if s]
    work = args.work
    if args.setup_only:
        setup(work, sizes, curve)
        return
    # Inputs are written by a child: a job forked from a parent that held the 2 GB base would report its RSS.
    subprocess.run([PY, __file__, "--work", str(work), "--sizes", args.sizes, "--curve", args.curve, "--setup-only"],
                   check=True)
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
        rows[f"scan-{n}"] = scan_row(n, cold) | {"rerun_s": warm["wall_s"]}
    for n in curve:  # the cost per adapter as the fleet grows: cold scans of r=8 fleets
        cmd = [lorafit, "scan", str(work / f"fleet-r8-{n}"), "--base", str(work / "config-1b"), "--json"]
        cold = run(cmd, f"lorafit scan {n} r=8 adapters (scan cache empty)", cache=cache,
                   before=lambda: shutil.rmtree(cache / "scan", ignore_errors=True), repeat=2)
        rows[f"curve-{n}"] = scan_row(n, cold)
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
    if args.ray:
        result["ray"] = bench_ray(work, sizes[-1], cache, lorafit) | {"date": result["date"]}
    elif (out / "scan.json").is_file():  # a run without --ray keeps the last Ray measurement, with its date
        ray = json.loads((out / "scan.json").read_text()).get("ray")
        if ray:
            result["ray"] = ray
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
    if curve:
        lines += ["", "Cost per adapter as the fleet grows (r=8 on every linear, 11 MB each; cold scans; the marginal "
                  "cost is the time added per adapter since the previous size):", "",
                  "| adapters | scan, cold (s) | adapters/s | ms per adapter | marginal ms per adapter | peak RSS (MB) "
                  "|", "|---|---|---|---|---|---|"]
        prev = None
        for n in curve:
            r = rows[f"curve-{n}"]
            marginal = "" if prev is None else round(1000 * (r["cold_s"] - prev["cold_s"]) / (n - prev["adapters"]), 2)
            r["marginal_ms"] = marginal or None
            lines.append(f"| {n} | {r['cold_s']} | {r['adapters_per_s']} | {r['per_adapter_ms']} | {marginal} | "
                         f"{r['peak_rss_mb']} |")
            prev = r
        (out / "scan.json").write_text(json.dumps(result, indent=2) + "\n")  # with the marginal costs
    if "ray" in result:
        same = rows.get(f"scan-{result['ray']['adapters']}", {}).get("cold_s")
        lines += ray_lines(result["ray"], same)
    (out / "scan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
