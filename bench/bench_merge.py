#!/usr/bin/env python
"""Benchmark lorafit merge and check against stock PEFT on a synthetic Llama-shaped ~1.1B checkpoint.

A script, never a test. It sets up, in a work dir (default bench/work/, gitignored):
  - base-1b: LlamaForCausalLM-shaped, hidden 2048, 16 layers, intermediate 8192, vocab 32000, GQA 32/8 heads
    (~1.1B parameters), bf16, random values, in 2 GB shards with an index, like hub checkpoints;
  - an r=16 adapter on q,k,v,o,gate,up,down of every layer (random non-zero B), written directly as
    safetensors + adapter_config.json;
  - 8B- and 70B-shaped model dirs (config.json only, no weights) with their own r=16 adapters.
Then runs each job as a subprocess and reads its wall time and peak RSS (the kernel's high-water mark,
from os.wait4): lorafit merge; stock PEFT (from_pretrained, PeftModel.from_pretrained, merge_and_unload,
save_pretrained); `cp -r` of the base (the I/O floor); lorafit check against the stock way of finding
out (load base + PeftModel.from_pretrained); lorafit check on the 8B and 70B shapes; the import floor.
It also compares lorafit's merged tensors with PEFT's bit for bit, and runs lorafit verify-merge.

Fairness on a shared 2-core machine: before each job the script syncs (no job pays for an earlier job's
dirty pages) and waits until the CPU is idle (a neighbour's test run skews timings 2x). All jobs read a
warm page cache (the base was just written). lorafit caches module trees; each lorafit job gets a fresh,
empty cache ("cold": the tree comes from the shipped blueprint), check runs a second time on it ("warm"),
and once more cold with LORAFIT_NO_BLUEPRINTS=1 ("no blueprint": imports transformers and builds the tree
on the meta device, as for an architecture lorafit has no blueprint of).

    .venv/bin/python bench/bench_merge.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONWARNINGS": "ignore"}

STOCK_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""
STOCK_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2])
"""


def llama_config(shape: str) -> dict[str, Any]:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "initializer_range": 0.02,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
        "head_dim": s["hidden_size"] // s["num_attention_heads"], **s,
    }


def weight_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaForCausalLM's tensors in checkpoint order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_base(out: Path, shard_bytes: int = 2_000_000_000) -> None:
    """Random bf16 weights, generated tensor by tensor and written one shard at a time with safetensors."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config("1b")
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}) + "\n")
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in weight_shapes(cfg):
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_adapter(out: Path, shape: str, base: str, r: int = 16, dtype: str = "float32") -> int:
    """An r=16 LoRA on every linear layer with random non-zero A and B. Returns its number of parameters."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config(shape)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in weight_shapes(cfg):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        rows, cols = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, cols, generator=g) / cols**0.5).to(getattr(torch, dtype))
        tensors[f"{key}.lora_B.weight"] = (torch.randn(rows, r, generator=g) * 0.01).to(getattr(torch, dtype))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
              "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "modules_to_save": None, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sum(t.numel() for t in tensors.values())


def setup(work: Path) -> None:
    """Write whatever of the inputs is missing: the 1B base and adapter, the 8B/70B configs and adapters."""
    base, adapter = work / "base-1b", work / "adapter-1b"
    if not base.exists():
        write_base(base)
    if not adapter.exists():
        write_adapter(adapter, "1b", str(base))
    for shape in ("8b", "70b"):
        d = work / f"config-{shape}"
        if not d.exists():
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
        if not (work / f"adapter-{shape}").exists():
            write_adapter(work / f"adapter-{shape}", shape, str(d), dtype="bfloat16")


def settle(max_wait: float = 600.0) -> None:
    """Flush dirty pages, then wait (bounded) until the CPU has been idle for 2 s."""
    import psutil

    os.sync()
    t0 = time.time()
    while time.time() - t0 < max_wait and psutil.cpu_percent(interval=2) > 8:
        pass


def run(cmd: list[str], label: str, cache: Path | None = None, repeat: int = 1, cold: bool = False,
        before: Callable[[], None] | None = None, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` `repeat` times, each after settle(): best and median wall, CPU time, peak RSS (wait4).

    cache: the LORAFIT_CACHE to use; cold=True empties it before every run. before: called before every run
    (e.g. to delete the previous run's output).
    """
    env = {**ENV, "LORAFIT_CACHE": str(cache)} if cache else dict(ENV)
    env.update(env_extra or {})
    walls, cpus, rss, out, err, code = [], [], [], "", "", 0
    for _ in range(repeat):
        if before:
            before()
        if cold and cache:
            shutil.rmtree(cache, ignore_errors=True)
        settle()
        # Output goes to files, not pipes: a child that fills a pipe nobody reads until wait4 returns never ends.
        with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=fout, stderr=ferr, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            walls.append(time.perf_counter() - t0)
            fout.seek(0)
            ferr.seek(0)
            out, err = fout.read().decode(errors="replace"), ferr.read().decode(errors="replace")
        cpus.append(usage.ru_utime + usage.ru_stime)
        rss.append(usage.ru_maxrss / 1024)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            print(err[-2000:], file=sys.stderr)
    row = {"job": label, "wall_s": round(min(walls), 2), "wall_median_s": round(statistics.median(walls), 2),
           "cpu_s": round(min(cpus), 2), "peak_rss_mb": round(max(rss), 1), "runs": len(walls), "exit": code,
           "stdout": out, "stderr": err}
    print(f"  {label:<52} best {row['wall_s']:7.2f} s  median {row['wall_median_s']:7.2f} s  cpu {row['cpu_s']:7.2f} s"
          f"  {row['peak_rss_mb']:8.1f} MB  exit {code}", flush=True)
    return row


def compare_outputs(a: Path, b: Path) -> tuple[int, list[str]]:
    """Tensors of two checkpoints compared bit for bit, streamed. Returns (tensors compared, names that differ)."""
    sys.path.insert(0, str(ROOT / "src"))
    from lorafit.fileio.checkpoint import Checkpoint

    with Checkpoint.open(a) as x, Checkpoint.open(b) as y:
        names = sorted(set(x.tensors) | set(y.tensors))
        bad = [n for n in names if n not in x.tensors or n not in y.tensors
               or x.tensors[n].shape != y.tensors[n].shape or x.tensors[n].dtype != y.tensors[n].dtype
               or any(p != q for p, q in zip(x.chunks(n), y.chunks(n), strict=True))]
    return len(names), bad


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (default: delete it at the end)")
    ap.add_argument("--workers", type=int, default=2, help="lorafit merge --workers")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each timed job (best and median reported)")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work: Path = args.work
    base, adapter = work / "base-1b", work / "adapter-1b"
    if args.setup_only:
        setup(work)
        return
    print(f"setup in {work}", flush=True)
    t0 = time.perf_counter()
    # In a child process: wait4's ru_maxrss of every later job would otherwise include this process's
    # RSS at fork time, and generating the base takes torch and a 2 GB shard.
    subprocess.run([PY, __file__, "--setup-only", "--work", str(work)], check=True)
    print(f"setup took {time.perf_counter() - t0:.0f} s", flush=True)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    lorafit = [PY, "-m", "lorafit.cli"]
    rows: dict[str, dict[str, Any]] = {}
    outs = {k: work / f"out-{k}" for k in ("lorafit", "peft", "cp")}
    caches = work / "caches"
    for o in [*outs.values(), caches]:
        shutil.rmtree(o, ignore_errors=True)

    k = args.repeat

    def clear(path: Path) -> Callable[[], None]:
        return lambda: shutil.rmtree(path, ignore_errors=True)

    print(f"jobs (each run {k} times; best and median wall, CPU time, peak RSS):", flush=True)
    rows["import"] = run([PY, "-c", "import torch, transformers"], "import floor: import torch, transformers",
                         repeat=k)
    rows["cp"] = run(["cp", "-r", str(base), str(outs["cp"])], "cp -r base (I/O floor)", repeat=k,
                     before=clear(outs["cp"]))
    rows["merge"] = run([*lorafit, "merge", str(adapter), "--base", str(base), "-o", str(outs["lorafit"]), "--json",
                         "--workers", str(args.workers)], "lorafit merge (cold tree cache)", caches / "merge",
                        repeat=k, cold=True, before=clear(outs["lorafit"]))
    rows["merge-warm"] = run([*lorafit, "merge", str(adapter), "--base", str(base), "-o", str(outs["lorafit"]),
                              "--json", "--workers", str(args.workers)], "lorafit merge (warm tree cache)",
                             caches / "merge", repeat=k, before=clear(outs["lorafit"]))
    rows["peft"] = run([PY, "-c", STOCK_MERGE, str(base), str(adapter), str(outs["peft"])],
                       "stock PEFT merge_and_unload + save_pretrained", repeat=k, before=clear(outs["peft"]))
    n, bad = compare_outputs(outs["lorafit"], outs["peft"])
    print(f"  lorafit vs PEFT output: {n} tensors compared, {len(bad)} differ {bad[:3]}", flush=True)
    rows["verify"] = run([*lorafit, "verify-merge", str(outs["lorafit"]), "--base", str(base), "--adapter",
                          str(adapter), "--json"], "lorafit verify-merge (lorafit's output)", caches / "merge")
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    rows["stock-check"] = run([PY, "-c", STOCK_CHECK, str(base), str(adapter)],
                              "stock check 1B (load base + PeftModel.from_pretrained)", repeat=k)
    for shape in ("1b", "8b", "70b"):
        model = base if shape == "1b" else work / f"config-{shape}"
        cmd = [*lorafit, "check", str(work / f"adapter-{shape}"), "--base", str(model), "--json"]
        rows[f"check-{shape}"] = run(cmd, f"lorafit check {shape.upper()} (cold tree cache)", caches / shape,
                                     repeat=k, cold=True)
        rows[f"check-{shape}-warm"] = run(cmd, f"lorafit check {shape.upper()} (warm tree cache)", caches / shape,
                                          repeat=k)
        rows[f"check-{shape}-meta"] = run(cmd, f"lorafit check {shape.upper()} (no blueprint: meta build)",
                                          caches / f"{shape}-meta", repeat=k, cold=True,
                                          env_extra={"LORAFIT_NO_BLUEPRINTS": "1"})
    report = render(rows, base_bytes, n, bad, args.workers)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "merge.md").write_text(report)
    raw = {k: {kk: vv for kk, vv in v.items() if kk != "stdout"} for k, v in rows.items()}
    (results / "merge.json").write_text(json.dumps({"date": datetime.date.today().isoformat(), "rows": raw},
                                                   indent=2) + "\n")
    print("\n" + report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def _json(row: dict[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(row["stdout"])
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _cells(r: dict[str, Any]) -> str:
    return f"{r['wall_s']} | {r['wall_median_s']} | {r['cpu_s']} | {r['peak_rss_mb']}"


def render(rows: dict[str, dict[str, Any]], base_bytes: int, compared: int, bad: list[str], workers: int) -> str:
    m, mw, p, c, sc = rows["merge"], rows["merge-warm"], rows["peft"], rows["cp"], rows["stock-check"]
    summary = _json(m).get("result", {})
    runs = m["runs"]
    lines = [
        "# lorafit merge / check benchmark",
        "",
        f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}. Synthetic LlamaForCausalLM-shaped base: hidden 2048, 16 layers, "
        f"intermediate 8192, vocab 32000, bf16, {base_bytes / 1e9:.2f} GB in 2 GB shards; adapter r=16 on "
        "q,k,v,o,gate,up,down (112 modules, fp32). Each job is its own process, run "
        f"{runs} times, each after `sync` and an idle CPU (the machine is shared: other users' jobs start "
        "mid-run, so the best of the runs is the estimate, the median shows the spread). Peak RSS is the kernel's "
        "high-water mark (wait4 ru_maxrss), the largest of the runs. Page cache warm for all jobs. "
        f"lorafit merge --workers {workers}. Cold = empty lorafit tree cache: the module tree comes from the "
        "shipped Llama blueprint, with no torch or transformers import; warm = the tree cache filled by an "
        "earlier run; no blueprint = cold with LORAFIT_NO_BLUEPRINTS=1, as for an architecture without a "
        "blueprint: the process imports transformers and builds the tree on the meta device.",
        "",
        "| job | wall best (s) | wall median (s) | CPU (s) | peak RSS (MB) | compared |",
        "|---|---:|---:|---:|---:|---|",
        f"| lorafit merge (cold) | {_cells(m)} | wall {ratio(m['wall_s'], p['wall_s'])} PEFT, "
        f"{ratio(m['wall_s'], c['wall_s'])} cp; RSS {100 * m['peak_rss_mb'] / p['peak_rss_mb']:.0f}% of PEFT |",
        f"| lorafit merge (warm) | {_cells(mw)} | wall {ratio(mw['wall_s'], p['wall_s'])} PEFT, "
        f"{ratio(mw['wall_s'], c['wall_s'])} cp; RSS {100 * mw['peak_rss_mb'] / p['peak_rss_mb']:.0f}% of PEFT |",
        f"| stock PEFT merge_and_unload + save_pretrained | {_cells(p)} | |",
        f"| cp -r base (I/O floor) | {_cells(c)} | |",
        f"| import floor (`import torch, transformers`) | {_cells(rows['import'])} | |",
        f"| lorafit verify-merge of lorafit's output (1 run) | {_cells(rows['verify'])} | "
        f"ok={_json(rows['verify']).get('ok')} |",
        f"| stock check 1B (load base + PeftModel.from_pretrained) | {_cells(sc)} | |",
    ]
    for shape in ("1b", "8b", "70b"):
        for tag, key in (("cold", f"check-{shape}"), ("warm", f"check-{shape}-warm"),
                         ("no blueprint", f"check-{shape}-meta")):
            r = rows[key]
            one = rows[key.replace(shape, "1b")]
            vs = (f"{ratio(sc['wall_s'], r['wall_s'])} faster than stock" if shape == "1b"
                  else f"{ratio(r['wall_s'], one['wall_s'])} the 1B {tag} time")
            lines.append(f"| lorafit check {shape.upper()} ({tag}{', config only' if shape != '1b' else ''}) | "
                         f"{_cells(r)} | {vs}; ok={_json(r).get('ok')} |")
    mb_s = summary.get("bytes_per_s")
    lines += [
        "",
        f"lorafit's merged checkpoint vs PEFT's: {compared} tensors compared bit for bit, {len(bad)} differ"
        + (f" ({', '.join(bad[:5])})" if bad else "") + "."
        + (" lorafit merge's own timer (last cold run; from reading the base's headers to the renamed output, "
           "the check and the imports it triggers included, Python start-up and the CLI's own imports not): "
           f"{summary.get('seconds')} s, "
           f"{mb_s / 1e6:.0f} MB/s of output." if mb_s else ""),
        "",
        "| target | result |",
        "|---|---|",
    ]
    for tag, r in (("cold", m), ("warm", mw)):
        lines += [
            f"| merge peak RSS <= 25% of PEFT's ({tag}) | {_ok(r['peak_rss_mb'] <= 0.25 * p['peak_rss_mb'])} "
            f"({100 * r['peak_rss_mb'] / p['peak_rss_mb']:.0f}%) |",
            f"| merge wall <= 0.8x PEFT's ({tag}) | {_ok(r['wall_s'] <= 0.8 * p['wall_s'])} "
            f"({ratio(r['wall_s'], p['wall_s'])}) |",
            f"| merge wall within 2x of cp ({tag}) | {_ok(r['wall_s'] <= 2 * c['wall_s'])} "
            f"({ratio(r['wall_s'], c['wall_s'])}) |",
        ]
    for tag, suffix in (("cold", ""), ("warm", "-warm"), ("no blueprint", "-meta")):
        one = rows[f"check-1b{suffix}"]
        lines.append(f"| check >= 3x faster than stock on 1B ({tag}) | {_ok(sc['wall_s'] >= 3 * one['wall_s'])} "
                     f"({ratio(sc['wall_s'], one['wall_s'])}) |")
        for shape in ("8b", "70b"):
            r = rows[f"check-{shape}{suffix}"]
            lines.append(f"| check {shape.upper()} <= 1.5x the 1B time ({tag}) | "
                         f"{_ok(r['wall_s'] <= 1.5 * one['wall_s'])} ({ratio(r['wall_s'], one['wall_s'])}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
