"""`lorafit demo`: the failure and its fix, end to end, on a tiny Llama trained in seconds. No download.

1. Train a LoRA adapter on AutoModelForCausalLM to count (10 11 12 -> 13 14 15 ...).
2. Load it the usual wrong way, with stock PEFT on AutoModel: AttributeError, or (task_type null) zeros.
3. `lorafit check` names the cause; `lorafit fix` rewrites the adapter.
4. Stock PEFT loads the fixed adapter on AutoModel and reproduces the trained hidden states bit for bit.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

PROMPT = [10, 11, 12]


def _tiny_llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _complete(model: Any, n: int = 6) -> list[int]:
    import torch

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def _train(model: Any, steps: int = 60) -> Any:
    """A few dozen Adam steps on counting sequences: enough for a visibly different completion."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    data = torch.tensor([list(range(s, s + 12)) for s in range(3, 19)])
    pm.train()
    for _ in range(steps):
        loss = pm(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def _hidden(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).last_hidden_state


def run_demo(keep: Path | None = None, started: float | None = None, quiet: bool = False) -> tuple[int, Any]:
    """Run the story. Returns (0 when every step behaved as shown, else 1; step 3's diagnosis Report).

    `started` (time.time() when the command started) lets the last line say the whole time, imports and model
    building included; `quiet` tells nothing, for a caller that prints the diagnosis in a machine format.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from .api.fix import fix
    from .render import render

    # a line wrapped by rich ends in a space; the terminal wraps it instead
    console = Console(soft_wrap=True, file=io.StringIO() if quiet else None)
    t0 = time.time()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lorafit-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        base_dir, adapter_dir = work / "tiny-llama", work / "counting-lora"
        fixed_dir, nulled_dir = work / "counting-lora-automodel", work / "counting-lora-task-null"
        console.print(Rule("1. train a LoRA adapter on AutoModelForCausalLM"))
        model = _tiny_llama()
        model.save_pretrained(base_dir)
        before = _complete(model)
        trained = _train(model)
        after = _complete(trained)
        trained.save_pretrained(adapter_dir)
        trained_hidden = _hidden(trained.get_base_model().model)
        console.print(f"prompt {PROMPT}: base model continues {before}, with the adapter {after}")
        ok &= before != after

        console.print(Rule("2. load it with stock PEFT on AutoModel, as feature extraction code does"))
        try:
            PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir)
            console.print("[red]unexpected: stock PEFT loaded it[/]")
        except AttributeError as e:
            console.print(f"PeftModel.from_pretrained -> [red]AttributeError: {e}[/]")
        # The usual workaround, task_type null, loads "fine" and does nothing.
        shutil.copytree(adapter_dir, nulled_dir, dirs_exist_ok=True)
        cfg = json.loads((nulled_dir / "adapter_config.json").read_text())
        (nulled_dir / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None}))
        base_hidden = _hidden(AutoModel.from_pretrained(base_dir).eval())
        stock = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), nulled_dir).eval()
        stock_hidden = _hidden(stock)
        same = torch.equal(stock_hidden, base_hidden)
        console.print(f"with task_type null it loads; hidden states equal the base model's: "
                      f"[{'red' if same else 'green'}]{same}[/] (every lora_B is zero, no error raised)")
        ok &= same

        console.print(Rule(f"3. $ lorafit check {adapter_dir.name} --base {base_dir.name} --class AutoModel"))
        from .api.check import check

        diagnosis = check(adapter_dir, base_dir, "AutoModel")
        render(diagnosis, console)
        console.print(Rule(f"$ lorafit fix {adapter_dir.name} --base {base_dir.name} --class AutoModel "
                           f"-o {fixed_dir.name}"))
        report = fix(adapter_dir, base_dir, fixed_dir, class_name="AutoModel", force=True)
        render(report, console)
        ok &= report.ok

        console.print(Rule("4. stock PEFT on AutoModel with the fixed adapter"))
        fixed = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), fixed_dir).eval()
        equal = torch.equal(_hidden(fixed), trained_hidden)
        console.print(f"hidden states equal the trained adapter's on its own class: "
                      f"[{'green' if equal else 'red'}]{equal}[/]")
        ok &= equal
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    verdict = "[green]demo OK[/]" if ok else "[red]demo FAILED[/]"
    whole = f", {time.time() - started:.1f}s with start-up and imports" if started is not None else ""
    console.print(f"{verdict} in {time.time() - t0:.1f}s{whole}" + (f"; files in {work}" if keep else ""))
    return (0 if ok else 1), diagnosis
