"""check --runtime: each serving runtime's rules, one adapter that triggers each (made with real PEFT where PEFT
can make it), the verdict per runtime, and bad input. The runtimes themselves need CUDA or a server, so the oracle
is each rule's source, quoted in docs/runtimes.md; a test here fails when a rule stops firing or fires on a clean
adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_adapter, save_base
from helpers import assert_one_line_error, cli, cli_json
from lorafit.api.runtimes import check_runtimes
from lorafit.findings import CATALOG
from lorafit.formats import read_adapter
from lorafit.targets.serving import BaseView, serving_runtimes

CAUSAL = "AutoModelForCausalLM"
SERVING = ["vllm", "sglang", "llama.cpp", "ollama", "lorax"]  # the runtimes that read PEFT adapters


@pytest.fixture(scope="module")
def made(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("runtimes")

    def make(name: str, family: str = "llama", class_name: str = CAUSAL, **lora: Any) -> Path:
        out = root / name
        if not out.exists():
            make_adapter(bases[family], class_name, out, **lora)
        return out

    return make


def _by_runtime(report: Any) -> dict[str, dict[str, Any]]:
    return {row["runtime"]: row for row in report.result["runtimes"]}


def _finding(report: Any, runtime: str, code: str) -> Any:
    found = [f for f in report.findings if f.code == code and (f.runtime or "").split("@")[0] == runtime]
    assert found, (runtime, code, [(f.code, f.runtime) for f in report.findings])
    return found[0]


def test_a_plain_adapter_loads_on_every_runtime_that_reads_peft(made: Any) -> None:
    report = check_runtimes(made("plain"), SERVING)
    assert report.ok, [(f.code, f.runtime, f.message) for f in report.findings]
    assert {r: row["verdict"] for r, row in _by_runtime(report).items()} == dict.fromkeys(SERVING, "loads")


def test_vllm_rank_above_max_lora_rank_and_the_setting_that_admits_it(made: Any) -> None:
    path = made("r32", r=32)
    f = _finding(check_runtimes(path, ["vllm"]), "vllm", "runtime-rank-limit")
    assert f.effect == "will-not-load" and "32" in f.message and f.hint == "start vLLM with --max-lora-rank 32"
    assert f.source.startswith("vllm/lora/peft_helper.py")
    assert check_runtimes(path, ["vllm"], settings={"max_lora_rank": 32}).ok
    # SGLang's default rank limit is the largest initial adapter's, so only the setting refuses it
    assert check_runtimes(path, ["sglang"]).ok
    _finding(check_runtimes(path, ["sglang"], settings={"max_lora_rank": 16}), "sglang", "runtime-rank-limit")


def test_dora_is_refused_or_applied_as_plain_lora(made: Any) -> None:
    report = check_runtimes(made("dora", use_dora=True), SERVING)
    rows = _by_runtime(report)
    for runtime in ("vllm", "sglang", "llama.cpp"):
        assert _finding(report, runtime, "runtime-dora").effect == "will-not-load"
        assert rows[runtime]["verdict"] == "will not load"
    assert _finding(report, "lorax", "runtime-dora").effect == "not-as-trained"
    assert rows["lorax"]["verdict"] == "loads, not as trained"


def test_lora_bias_is_refused_by_vllm_and_llama_cpp(made: Any) -> None:
    report = check_runtimes(made("bias", lora_bias=True), SERVING)
    assert {(f.runtime or "").split("@")[0] for f in report.findings if f.code == "runtime-lora-bias"} == \
        {"vllm", "llama.cpp"}


def test_rslora_scale_per_runtime(made: Any) -> None:
    """PEFT scales by alpha/sqrt(r) with use_rslora: vLLM and LoRAX do too; SGLang, and llama.cpp's converter (and
    Ollama's) apply alpha/r; vLLM before 0.7 refused it."""
    path = made("rslora", use_rslora=True)
    report = check_runtimes(path, SERVING)
    scale_wrong = {(f.runtime or "").split("@")[0] for f in report.findings if f.code == "runtime-scale"}
    assert scale_wrong == {"sglang", "llama.cpp", "ollama"}
    f = _finding(report, "sglang", "runtime-scale")
    assert "applies scale 2 where PEFT applies 4" in f.message and "use_rslora" in f.message  # alpha 8, r 4
    old = check_runtimes(path, ["vllm@0.6.6"])
    assert _finding(old, "vllm", "runtime-rslora").effect == "will-not-load"


def test_patterns_are_ignored_by_runtimes_that_take_the_global_r_and_alpha(made: Any) -> None:
    report = check_runtimes(made("patterns", alpha_pattern={"down_proj": 32}), SERVING)
    scale_wrong = {(f.runtime or "").split("@")[0] for f in report.findings if f.code == "runtime-scale"}
    assert scale_wrong == set(SERVING)
    assert all(f.keys == [p for p in f.keys if p.endswith("down_proj")] for f in report.findings)


def test_llama_cpp_scales_by_each_tensors_own_rank(made: Any) -> None:
    """alpha / rank per tensor: a rank_pattern alone keeps PEFT's scale in llama.cpp, not in vLLM."""
    report = check_runtimes(made("rank-pattern", rank_pattern={"down_proj": 8}), ["llama.cpp", "vllm"])
    assert {(f.runtime or "").split("@")[0] for f in report.findings if f.code == "runtime-scale"} == {"vllm"}


def test_trained_heads_and_full_weights(made: Any) -> None:
    report = check_runtimes(made("head", modules_to_save=["lm_head"]), SERVING)
    assert _finding(report, "vllm", "runtime-modules-to-save").effect == "will-not-load"
    full = _finding(report, "vllm", "runtime-full-weights")
    assert full.keys == ["base_model.model.lm_head.weight"] and "unsupported LoRA weight" in full.message
    _finding(report, "llama.cpp", "runtime-full-weights")
    assert _finding(report, "lorax", "runtime-keys-unused").keys == ["base_model.model.lm_head.weight"]


def test_sglang_string_targets_partial_qkv_and_target_limit(made: Any) -> None:
    report = check_runtimes(made("regex", target_modules=r".*\.(q_proj|v_proj)"), ["sglang"])
    assert "Only 'all' or 'all-linear'" in _finding(report, "sglang", "runtime-target-modules").message
    q_only = check_runtimes(made("q-only", target_modules=["q_proj", "k_proj"]), ["sglang"])
    f = _finding(q_only, "sglang", "runtime-qkv-incomplete")
    assert f.keys[0].endswith("self_attn.v_proj") and "KeyError" in f.message
    assert not any(f.code == "runtime-qkv-incomplete" for f in check_runtimes(made("plain"), ["sglang"]).findings)
    limited = check_runtimes(made("plain"), ["sglang"], settings={"lora_target_modules": ["q_proj", "v_proj"]})
    assert _finding(limited, "sglang", "runtime-target-modules").keys == ["down_proj"]


def test_sglang_drops_modules_outside_layers_n(made: Any) -> None:
    """GPT-2 keeps its blocks under h.N: SGLang's get_layer_id finds no layer id, so every key is dropped."""
    report = check_runtimes(made("gpt2", family="gpt2"), ["sglang"])
    f = _finding(report, "sglang", "runtime-keys-unused")
    assert f.count == 4 and f.effect == "not-as-trained"


def test_lorax_drops_a_module_type_some_layer_lacks(made: Any) -> None:
    """q_proj on layers 0 and 1, down_proj on layer 0 only: LoRAX drops down_proj in both."""
    assert not any(f.code == "runtime-module-dropped" for f in check_runtimes(made("plain"), ["lorax"]).findings)
    path = made("partial", target_modules=r".*layers\.(0\.mlp\.down_proj|\d\.self_attn\.q_proj)")
    f = _finding(check_runtimes(path, ["lorax"]), "lorax", "runtime-module-dropped")
    assert f.keys == ["down_proj"] and f.effect == "not-as-trained"


def test_lorax_module_type_dropped_with_the_base_layers(made: Any, bases: dict[str, Path]) -> None:
    """With the base, LoRAX's layer set is the base's: an adapter on layer 0 of 2 loses every module type."""
    report = check_runtimes(made("layer0", layers_to_transform=[0]), ["lorax"], base=bases["llama"])
    f = _finding(report, "lorax", "runtime-module-dropped")
    assert sorted(f.keys) == ["down_proj", "q_proj", "v_proj"]


def test_paths_of_another_class_are_unused_or_refused(made: Any, bases: dict[str, Path]) -> None:
    """An adapter saved from AutoModel names layers.0…; the servers load LlamaForCausalLM (model.layers.0…)."""
    report = check_runtimes(made("automodel", class_name="AutoModel"), SERVING, base=bases["llama"])
    rows = _by_runtime(report)
    assert rows["vllm"]["verdict"] == "loads, not as trained"
    assert rows["lorax"]["verdict"] == "loads, not as trained"
    assert rows["llama.cpp"]["verdict"] == "will not load"
    assert rows["ollama"]["verdict"] == "will not load"
    assert rows["sglang"]["verdict"] == "loads"  # SGLang files weights by layer id and module name
    f = _finding(report, "vllm", "runtime-keys-unused")
    assert f.count == 6 and "--class LlamaForCausalLM" in (f.hint or "")
    assert check_runtimes(made("plain"), SERVING, base=bases["llama"]).ok


def test_ollama_refuses_architectures_other_than_llama_and_gemma2(made: Any, bases: dict[str, Path]) -> None:
    report = check_runtimes(made("gpt2", family="gpt2"), ["ollama"], base=bases["gpt2"])
    assert "'gpt2'" in _finding(report, "ollama", "runtime-architecture").message
    names = _finding(report, "ollama", "runtime-target-modules")
    assert sorted(names.keys) == ["c_attn", "c_fc"]


def _hand_made(root: Path, modules: list[str], r: int = 2) -> Path:
    """A PEFT-layout adapter with modules no tiny model here has (vision towers): config and tensors by hand."""
    root.mkdir()
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.ones(r, 8)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.ones(8, r)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    (root / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": names, "task_type": "CAUSAL_LM"}))
    return root


def test_vision_tower_keys(tmp_path: Path) -> None:
    path = _hand_made(tmp_path / "vlm", ["model.language_model.layers.0.self_attn.q_proj",
                                         "model.vision_tower.encoder.layers.0.self_attn.q_proj"])
    report = check_runtimes(path, ["vllm", "sglang", "llama.cpp"])
    vision = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj".removeprefix("base_model.model.")
    assert _finding(report, "vllm", "runtime-keys-unused").keys == [vision]
    assert _finding(report, "llama.cpp", "runtime-keys-unused").keys == [vision]
    assert _finding(report, "sglang", "runtime-vision-misplaced").keys == [vision]
    assert check_runtimes(path, ["vllm"], settings={"enable_tower_connector_lora": True}).ok


def test_vllm_target_modules_it_cannot_wrap(made: Any) -> None:
    """vLLM wraps linear and vocabulary layers; a LoRA landing on anything else is an unexpected target."""
    adapter = read_adapter(made("plain"))
    some = next(iter(adapter.modules))
    view = BaseView("llama", "LlamaForCausalLM", [], kinds={some: "conv"} | {p: "linear" for p in
                                                                             list(adapter.modules)[1:]})
    found = serving_runtimes()["vllm"].judge(adapter, "0.26.0", {}, view)
    assert [(f.code, f.keys) for f in found] == [("runtime-target-modules", [some])]


def test_mlx_lm_reads_its_own_format(made: Any) -> None:
    report = check_runtimes(made("plain"), ["mlx"])
    f = _finding(report, "mlx", "runtime-format")
    assert f.effect == "will-not-load" and f.hint and "--to mlx" in f.hint and "num_layers" in (f.source or "")


def test_cli_repeated_runtimes_one_verdict_each(made: Any) -> None:
    code, out, _ = cli("check", made("dora", use_dora=True), "--runtime", "vllm", "-r", "lorax,llama.cpp")
    assert code == 1
    assert re.search(r"vllm@\S+\s+will not load\s+dora", out)
    assert re.search(r"lorax@\S+\s+loads, not as trained\s+dora", out)
    code, report = cli_json("check", made("dora", use_dora=True), "--runtime", "vllm@0.8.3")
    f = next(f for f in report["findings"] if f["code"] == "runtime-dora")
    assert (f["runtime"], f["effect"]) == ("vllm@0.8.3", "will-not-load") and f["source"]
    assert report["result"]["runtimes"] == [{"runtime": "vllm", "version": "0.8.3", "verdict": "will not load",
                                             "errors": 1, "codes": ["runtime-dora"]}]


def test_cli_runtime_settings(made: Any) -> None:
    assert cli("check", made("r32", r=32), "--runtime", "vllm", "--max-lora-rank", "32").code == 0
    assert cli("check", made("r32", r=32), "--runtime", "vllm").code == 1


def test_inspect_shows_the_runtime_matrix(made: Any) -> None:
    code, report = cli_json("inspect", made("dora", use_dora=True))
    assert code == 0
    rows = {r["runtime"]: r["verdict"] for r in report["result"]["runtimes"]}
    assert rows == {"vllm": "will not load", "sglang": "will not load", "llama.cpp": "will not load",
                    "ollama": "loads", "lorax": "loads, not as trained", "mlx": "will not load"}
    assert "runtimes" in cli("inspect", made("dora", use_dora=True)).out


@pytest.mark.parametrize(("args", "expected"), [
    (["--runtime", "tgi"], "unknown runtime 'tgi'; known: transformers, vllm, sglang, llama.cpp, ollama, lorax, mlx"),
    (["--runtime", "vllm@0.1.0"], "lorafit does not know the rules of vllm 0.1.0; known: 0.6.6, 0.26.0"),
    (["--runtime", "vllm@latest"], "vllm version 'latest' is not a release number"),
])
def test_bad_runtime_input_is_one_line_and_exit_2(made: Any, args: list[str], expected: str) -> None:
    code, out, err = cli("check", made("plain"), *args)
    assert_one_line_error(code, out, err, expected)


def test_every_runtime_code_is_in_the_catalog_with_runtime_scope() -> None:
    codes = {r.code for rt in serving_runtimes().values() for r in rt.rules} | {"runtime-format"}
    assert codes <= {c for c, p in CATALOG.items() if p.scope == "runtime"}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "runtimes.md").read_text()
    for rt in serving_runtimes().values():
        for rule in rt.rules:
            assert rule.source.split(":")[0] in doc, (rt.name, rule.source)


def test_a_base_with_another_layout_still_gets_the_adapter_alone_verdicts(made: Any, tmp_path: Path) -> None:
    base = save_base(tmp_path, "llama")
    report = check_runtimes(made("dora", use_dora=True), ["vllm"], base=base)
    assert _finding(report, "vllm", "runtime-dora")


def test_a_resized_vocabulary_saves_full_weights_even_without_modules_to_save(bases: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """PEFT saves embed_tokens and lm_head whole when the vocabulary was resized, whatever modules_to_save says:
    the servers judge the tensor keys, so lorafit does too."""
    from peft import LoraConfig, get_peft_model

    from conftest import load_model

    model = load_model(bases["llama"], CAUSAL)
    model.resize_token_embeddings(80)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "a")
    report = check_runtimes(tmp_path / "a", SERVING)
    assert not any(f.code == "runtime-modules-to-save" for f in report.findings)  # the config names none ...
    full = _finding(report, "vllm", "runtime-full-weights")  # ... and the keys say otherwise
    assert sorted(full.keys) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert _by_runtime(report)["llama.cpp"]["verdict"] == "will not load"


def test_mlx_lm_refuses_tensors_its_model_lacks_as_lorafit_says(bases: dict[str, Path], made: Any,
                                                               tmp_path: Path) -> None:
    """An mlx-lm adapter whose module names are not the model's: mlx-lm 0.32 raises (the installed client is the
    oracle); before 0.32.0 it ignored them silently."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_load_model
    from safetensors.torch import load_file as load_st

    code, _ = cli_json("convert", made("plain"), "--to", "mlx", "-o", tmp_path / "mlx")
    assert code == 0
    weights = tmp_path / "mlx" / "adapters.safetensors"
    tensors = {k.replace("v_proj", "value"): v for k, v in load_st(weights).items()}
    save_file(tensors, str(weights))
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    config["lora_parameters"]["keys"] = [k.replace("v_proj", "value") for k in config["lora_parameters"]["keys"]]
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(config))
    now = check_runtimes(tmp_path / "mlx", ["mlx"], base=bases["llama"])
    f = _finding(now, "mlx", "runtime-keys-unused")
    assert f.effect == "will-not-load" and f.count == 2
    model, _ = mlx_load_model(bases["llama"])
    with pytest.raises(Exception, match="contains incompatible tensors"):
        load_adapters(model, str(tmp_path / "mlx"))
    before = check_runtimes(tmp_path / "mlx", ["mlx@0.31.0"], base=bases["llama"])
    assert _finding(before, "mlx", "runtime-keys-unused").effect == "not-as-trained"
