"""Factories for tiny real models (built from configs, never downloaded) and real PEFT adapters."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Module trees are cached per run, never in the user's ~/.cache.
os.environ.setdefault("LORAFIT_CACHE", tempfile.mkdtemp(prefix="lorafit-test-cache-"))
warnings.filterwarnings("ignore")

# tests/clients/ runs real inference clients that need a long build (llama-cpp-python): `make test-clients`
# sets LORAFIT_CLIENTS=1 and runs them; `make test` runs everything else.
collect_ignore = [] if os.environ.get("LORAFIT_CLIENTS") else ["clients"]

from hypothesis import settings  # noqa: E402

# Same examples on every run: CI must not turn red on a case a developer never saw. To hunt for new
# cases, run with --hypothesis-profile=default.
settings.register_profile("lorafit", derandomize=True, database=None)
settings.register_profile("default")
settings.load_profile("lorafit")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


def tiny_config(family: str, **overrides: Any) -> Any:
    """A few-kilobyte config of each family the tests cover."""
    if family == "llama":
        kw = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
        kw.update(overrides)
        return transformers.LlamaConfig(**kw)
    if family == "gpt2":
        kw = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
        kw.update(overrides)
        return transformers.GPT2Config(**kw)
    if family == "bert":
        kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=64, num_labels=3)
        kw.update(overrides)
        return transformers.BertConfig(**kw)
    if family == "opt":  # a decoder nested one level deeper: OPTForCausalLM.model.decoder.layers
        kw = dict(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1)
        kw.update(overrides)
        return transformers.OPTConfig(**kw)
    if family == "bart":  # encoder-decoder; encoder/decoder embed_tokens are tied aliases of model.shared
        kw = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
        kw.update(overrides)
        return transformers.BartConfig(**kw)
    raise ValueError(family)


# The head class each family is saved with; AutoModel and the others load from the same directory.
HEAD_CLASS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "opt": "AutoModelForCausalLM",
              "bert": "AutoModelForSequenceClassification", "bart": "AutoModelForSeq2SeqLM"}
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "v_proj", "fc2"],
                "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"], "bart": ["q_proj", "v_proj"]}


def save_base(root: Path, family: str, **overrides: Any) -> Path:
    """Save a tiny random model of `family` with its head class; returns the directory."""
    torch.manual_seed(0)
    out = root / f"{family}-base"
    model = getattr(transformers, HEAD_CLASS[family]).from_config(tiny_config(family, **overrides))
    model.save_pretrained(out)
    return out


def load_model(base: Path, class_name: str) -> Any:
    return getattr(transformers, class_name).from_pretrained(str(base)).eval()


def make_adapter(base: Path, class_name: str, out: Path, seed: int = 1, **lora: Any) -> PeftModel:
    """Create a real PEFT adapter on `class_name` with random (non-zero) lora_B, save it to `out`."""
    torch.manual_seed(seed)
    model = load_model(base, class_name)
    family = next(f for f in ("gpt2", "bert", "opt", "llama", "bart") if f"{f}-base" in str(base))
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS[family],
                              "init_lora_weights": False}
    if family == "gpt2":
        kwargs["fan_in_fan_out"] = True
    kwargs.update(lora)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    pm.eval()
    pm.save_pretrained(out)
    return pm


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny base model per family, shared by the whole session."""
    root = tmp_path_factory.mktemp("bases")
    return {f: save_base(root, f) for f in ("llama", "gpt2", "bert", "opt")}


# A check that its module tree can come from a blueprint: it needs neither torch nor transformers.
BLUEPRINT_CHECK = ("r = lorafit.check(sys.argv[1], sys.argv[2], 'AutoModelForCausalLM')\n"
                   "print(r.ok, 'torch' in sys.modules, 'transformers' in sys.modules, r.target['tree_from'])\n")


@pytest.fixture(scope="session")
def cold_start(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fresh Python for both cold-import tests: it imports lorafit.cli, as `lorafit` does when it starts, and
    says which heavy libraries that loaded ("cli_imports", test_cli); then it runs BLUEPRINT_CHECK on "adapter"
    ("blueprint_check", test_blueprint). Each is a print of its own, made before anything later could import more."""
    from helpers import python

    adapter = tmp_path_factory.mktemp("cold-start") / "a"
    make_adapter(bases["llama"], "AutoModelForCausalLM", adapter)
    code = ("import sys\nimport lorafit.cli\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n" + BLUEPRINT_CHECK)
    lines = python(code, adapter, bases["llama"], env={"LORAFIT_NO_CACHE": "1"}, check=True).out.strip().splitlines()
    assert len(lines) == 2, lines
    return {"adapter": adapter, "cli_imports": lines[0].strip(), "blueprint_check": lines[1]}
