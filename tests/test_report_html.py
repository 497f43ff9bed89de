"""lorafit report: one self-contained HTML page per adapter or scan. No browser installs here (Playwright's browsers
come from a CDN), so the page is parsed: every figure is there with a non-empty SVG, nothing is fetched from the
network, and the data the figures draw agrees with PEFT itself (its delta weights, and what its loader lands)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from conftest import load_model, make_adapter
from helpers import assert_one_line_error, cli, cli_json, snapshot
from lorafit.api.report_page import figures_of

CAUSAL = "AutoModelForCausalLM"


class Page(HTMLParser):
    """Figures (name -> drawn SVG elements) and every external reference a browser would fetch."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.figures: dict[str, int] = {}
        self.external: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self._open: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure":
            self._open.append(a["data-figure"] or "")
            self.figures[self._open[-1]] = 0
        elif self._open and tag in ("path", "rect", "use", "image", "polygon", "line"):
            self.figures[self._open[-1]] += 1
        if tag == "script":
            self.scripts.append(a)
        for name in ("src", "href", "xlink:href"):
            value = a.get(name) or ""
            if value and not value.startswith(("#", "data:")):
                self.external.append(f"{tag} {name}={value}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self._open:
            self._open.pop()


def _page(path: Path) -> tuple[Page, dict[str, Any]]:
    text = path.read_text()
    return Page(text), figures_of(text)


@pytest.fixture(scope="module")
def adapter(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "adapter"
    # rsLoRA and a per-module alpha: the drawn norms must carry each module's own scale
    make_adapter(bases["llama"], CAUSAL, out, task_type="CAUSAL_LM", use_rslora=True,
                 alpha_pattern={"down_proj": 3})
    return out


def test_adapter_page_is_self_contained_and_draws_peft_deltas(adapter: Path, bases: dict[str, Path],
                                                              tmp_path: Path) -> None:
    before = snapshot(adapter)
    code, report = cli_json("report", adapter, "--base", bases["llama"], "-o", tmp_path / "page.html")
    assert code == 0 and report["result"]["figures"] == ["coverage", "norms"]
    assert snapshot(adapter) == before
    page, data = _page(tmp_path / "page.html")
    assert page.external == [] and all(s.get("type") == "application/json" for s in page.scripts)
    assert set(page.figures) == {"coverage", "norms"} and all(n > 20 for n in page.figures.values()), page.figures
    cells = {c["at"]: c for c in data["figures"]["cells"]}
    pm = PeftModel.from_pretrained(load_model(bases["llama"], CAUSAL), str(adapter))
    layers = {name.removeprefix("base_model.model."): m for name, m in pm.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A}
    assert layers and set(layers) == {p for p, c in cells.items() if c["status"] == "lands"}
    for path, layer in layers.items():
        want = float(torch.linalg.matrix_norm(layer.get_delta_weight("default").double()))
        assert cells[path]["norm"] == pytest.approx(want, rel=1e-6), path  # PEFT forms it in float32
        assert cells[path]["rank"] == 4 and cells[path]["alpha"] == (3 if path.endswith("down_proj") else 8)
    # modules of the same kinds the adapter leaves alone are drawn as such: here, none (q, v, down on every layer)
    assert data["figures"]["counts"] == {"lands": len(layers)}
    assert data["figures"]["columns"] == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def _stock(adapter: Path, base: Path, cls: str) -> tuple[set[str], set[str]]:
    """What stock PEFT does: (modules whose saved tensors it holds, bit for bit; modules it leaves at init)."""
    config = LoraConfig.from_pretrained(str(adapter))
    if cls == "AutoModel":
        config.task_type = None  # PEFT's causal-LM wrapper refuses a model with no generate; the plain one loads
    pm = PeftModel.from_pretrained(load_model(base, cls), str(adapter), config=config)
    held, saved = get_peft_model_state_dict(pm), load_file(str(adapter / "adapter_model.safetensors"))

    def module(key: str) -> str:
        return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]

    landed = {module(k) for k, v in saved.items() if "lora_B" in k and k in held and torch.equal(held[k], v)}
    return landed, {module(k) for k in held if "lora_B" in k and k not in saved}


def _status(data: dict[str, Any], status: str) -> set[str]:
    return {c["at"] for c in data["figures"]["cells"] if c["status"] == status}


def test_dropped_and_at_init_agree_with_the_stock_loader(adapter: Path, bases: dict[str, Path],
                                                         tmp_path: Path) -> None:
    # AutoModel: the causal LM's paths (model.layers...) are not the backbone's (layers...): PEFT lands nothing
    code, report = cli_json("report", adapter, "--base", bases["llama"], "--class", "AutoModel", "-o",
                            tmp_path / "automodel.html")
    _, data = _page(tmp_path / "automodel.html")
    assert code == 1 and "layout-mismatch" in {f["code"] for f in report["findings"]}
    landed, at_init = _stock(adapter, bases["llama"], "AutoModel")
    assert landed == _status(data, "lands") == set()
    assert at_init == set(data["figures"]["at_init"]) and len(at_init) == 6
    assert len(_status(data, "dropped")) == 6
    # one module's tensors removed from the file: PEFT leaves that module at init, and the page says which
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    gone = "model.layers.1.self_attn.v_proj"
    save_file({k: v for k, v in tensors.items() if gone not in k}, str(partial / "adapter_model.safetensors"))
    cli_json("report", partial, "--base", bases["llama"], "-o", tmp_path / "partial.html")
    _, data = _page(tmp_path / "partial.html")
    landed, at_init = _stock(partial, bases["llama"], CAUSAL)
    assert at_init == _status(data, "at init") == set(data["figures"]["at_init"]) == {gone}
    assert landed == _status(data, "lands") and len(landed) == 5


def test_scan_page(bases: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    make_adapter(bases["llama"], CAUSAL, root / "ok", task_type="CAUSAL_LM")
    make_adapter(bases["llama"], CAUSAL, root / "automodel")  # no task_type: judged on AutoModel, an error
    make_adapter(bases["gpt2"], CAUSAL, root / "gpt2", task_type="CAUSAL_LM")
    env = {"LORAFIT_CACHE": str(tmp_path / "cache")}
    cli("scan", root, "--runtime", "transformers,vllm,mlx", "-o", tmp_path / "scan", env=env)
    code, report = cli_json("report", tmp_path / "scan", "-o", tmp_path / "scan.html")
    assert code == 0 and report["result"]["figures"] == ["verdicts", "by-base", "by-code"]
    page, data = _page(tmp_path / "scan.html")
    assert page.external == [] and all(n > 5 for n in page.figures.values()), page.figures
    figures = data["figures"]
    records = [json.loads(line) for line in (tmp_path / "scan" / "scan.jsonl").read_text().splitlines()]
    assert figures["adapters"] == [r["adapter"] for r in records] and figures["columns"] == [
        "check", "transformers", "vllm", "mlx"]
    for r, row in zip(records, figures["verdicts"], strict=True):
        assert row[1:] == [x["verdict"] for x in r["report"]["result"]["runtimes"]]
        assert row[0] == "error"  # mlx-lm refuses every PEFT-format adapter: an error finding in each record
    assert figures["by_code"]["layout-mismatch"] == [str(root / "automodel")]
    assert figures["by_code"]["runtime-format"] == sorted(str(root / n) for n in ("automodel", "gpt2", "ok"))
    assert sorted(len(v) for v in figures["by_base"].values()) == [1, 2]


def test_bad_input(adapter: Path, tmp_path: Path) -> None:
    assert_one_line_error(*cli("report", tmp_path / "nope", "-o", tmp_path / "x.html"), "nope")
    out = tmp_path / "exists.html"
    out.write_text("mine")
    assert_one_line_error(*cli("report", adapter, "-o", out), "exists")
    assert out.read_text() == "mine"
    scan_dir = tmp_path / "scan"
    scan_dir.mkdir()
    (scan_dir / "scan.jsonl").write_text('{"adapter": "a"}\nnot json\n')
    assert_one_line_error(*cli("report", scan_dir, "-o", tmp_path / "s.html"), "scan.jsonl", "line 2")
    assert not (tmp_path / "s.html").exists() and not (tmp_path / "x.html").exists()


def test_moe_expert_norms_are_peft_deltas(tmp_path: Path) -> None:
    """A LoRA on fused experts' parameters (PEFT's target_parameters) is one delta per expert: the drawn norm is
    that of PEFT's own ParamWrapper delta, with the scale of the parameter it adapts."""
    from peft import get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention", "sliding_attention"])
    model = GptOssForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                          rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}))
    with torch.no_grad():  # trained: B != 0
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    code, _ = cli_json("report", tmp_path / "adapter", "--base", tmp_path / "base", "-o", tmp_path / "moe.html")
    cells = {c["path"]: c for c in _page(tmp_path / "moe.html")[1]["figures"]["cells"]}
    wrappers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                if hasattr(m, "parameter_name") and "default" in getattr(m, "lora_A", {})}
    assert code == 0 and len(wrappers) == 4
    for path, wrapper in wrappers.items():
        want = float(torch.linalg.vector_norm(wrapper.get_delta_weight("default").double()))
        assert cells[path]["norm"] == pytest.approx(want, rel=1e-6), path
        assert cells[path]["rank"] == (2 if wrapper.parameter_name == "down_proj" else 4), path

