"""Hostile adapters: every one gets a verdict or one line and exit 2, in bounded time and memory, never a hang,
a traceback or the "please report it" catch-all. Each case is a regression test for a defect found by fuzzing."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from helpers import assert_one_line_error, cli, snapshot


@pytest.fixture(scope="module")
def good(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "adapter"
    make_adapter(bases["llama"], "AutoModelForCausalLM", out, task_type="CAUSAL_LM")
    return out


@pytest.fixture()
def adapter(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(good, dst)
    return dst


def edit_config(path: Path, **fields: object) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- special files: never block

@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_fifo_is_refused_without_blocking(adapter: Path, name: str) -> None:
    (adapter / name).unlink()
    os.mkfifo(adapter / name)
    done = cli("inspect", adapter, process=True, timeout=60)  # before: blocked forever on open()
    assert_one_line_error(*done, name, "FIFO")


def test_config_symlinked_to_dev_zero_is_refused(adapter: Path) -> None:
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to("/dev/zero")
    done = cli("inspect", adapter, process=True, timeout=60)  # before: read until 7.5 GB
    assert_one_line_error(*done, "adapter_config.json", "character device")


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_directory_in_place_of_a_file(adapter: Path, name: str) -> None:
    (adapter / name).unlink()
    (adapter / name).mkdir()
    assert_one_line_error(*cli("inspect", adapter), name, "directory")


# ----------------------------------------------------------------------------- regexes

@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "exclude_modules"])
def test_catastrophic_regex_does_not_hang(adapter: Path, bases: dict[str, Path], field: str) -> None:
    value: object = {"(.|.)*Z": 4} if field == "rank_pattern" else "(.|.)*Z"
    edit_config(adapter, **{field: value})
    done = cli("check", adapter, "--base", bases["llama"], "--json", process=True, timeout=90)  # before: hung
    assert done.code in (0, 1), done.err
    assert json.loads(done.out)["command"] == "check"


def test_regex_timeout_is_one_line(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern slow even for the regex engine stops at the timeout with a one-line error naming the config."""
    from lorafit import user_regex

    monkeypatch.setattr(user_regex, "TIMEOUT_S", 1e-9)
    user_regex._compiled.cache_clear()
    edit_config(adapter, rank_pattern={"(a|aa)*(b|c)*x": 2})
    assert_one_line_error(*cli("inspect", adapter), "adapter_config.json", "catastrophic backtracking")
    user_regex._compiled.cache_clear()


@pytest.mark.parametrize("fields, what", [
    ({"rank_pattern": {"(?i)q_proj": 2}}, "rank_pattern key"),
    ({"alpha_pattern": {"(?i)q_proj": 2}}, "alpha_pattern key"),
    ({"modules_to_save": ["foo("]}, "modules_to_save entry"),
    ({"layers_pattern": "(", "layers_to_transform": [0]}, "layers_pattern"),
])
def test_regex_that_peft_cannot_compile(adapter: Path, fields: dict, what: str) -> None:
    edit_config(adapter, **fields)
    assert_one_line_error(*cli("inspect", adapter), "adapter_config.json", what, "re raises")


# ----------------------------------------------------------------------------- JSON budgets

@pytest.mark.parametrize("text, why", [
    ("[" * 10000 + "]" * 10000, "nested too deeply"),
    ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", "not usable JSON"),
    ('{"peft_type": "LORA", "x": ' + "[" * 70 + "]" * 70 + "}", "nested too deeply"),
])
def test_config_json_budgets(adapter: Path, text: str, why: str) -> None:
    (adapter / "adapter_config.json").write_text(text)
    assert_one_line_error(*cli("inspect", adapter), "adapter_config.json", why)


def _rewrite_header(path: Path, edit: object) -> None:
    """Replace the safetensors header with `edit(header_text)`'s output, keeping the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8:8 + n].decode())  # type: ignore[operator]
    new = header.encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_header_with_a_duplicate_key(adapter: Path) -> None:
    w = adapter / "adapter_model.safetensors"

    def dup(text: str) -> str:
        header = json.loads(text)
        key = next(k for k in header if k != "__metadata__")
        return text.rstrip()[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}" + "}"

    _rewrite_header(w, dup)
    assert_one_line_error(*cli("inspect", adapter), "adapter_model.safetensors", "appears twice")


def test_header_with_overlapping_tensors(adapter: Path) -> None:
    w = adapter / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(w)).items()}
    save_file(tensors, str(w))

    def overlap(text: str) -> str:
        header = json.loads(text)
        keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[keys[0]], header[keys[1]]
        if a["dtype"] == b["dtype"] and a["shape"] == b["shape"]:
            b["data_offsets"] = list(a["data_offsets"])  # two tensors on the same bytes
        else:
            header[keys[1]] = dict(a)
        return json.dumps(header)

    _rewrite_header(w, overlap)
    assert_one_line_error(*cli("inspect", adapter), "adapter_model.safetensors", "overlaps")


def test_header_with_an_unknown_dtype(adapter: Path) -> None:
    w = adapter / "adapter_model.safetensors"
    _rewrite_header(w, lambda text: text.replace('"F32"', '"C64"', 1))
    assert_one_line_error(*cli("inspect", adapter), "adapter_model.safetensors", "'C64'")


# ----------------------------------------------------------------------------- .bin tensors against their storage

def _as_bin(adapter: Path, extra: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.clone() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**tensors, **extra}, adapter / "adapter_model.bin")


@pytest.mark.parametrize("make, why", [
    (lambda: torch.zeros(1).expand(60000, 60000), "expanded or overlapping view"),
    (lambda: torch.empty(4, 16, device="meta"), "meta device"),
    (lambda: torch.zeros(4, 16).to_sparse(), "sparse"),
    (lambda: torch.zeros(4, 16, dtype=torch.complex64), "complex64"),
])
def test_bin_tensor_that_its_file_does_not_hold(adapter: Path, make: object, why: str) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _as_bin(adapter, {key: make()})  # type: ignore[operator]
    before = snapshot(adapter)
    done = cli("inspect", adapter, process=True, timeout=120)  # before: a 14.4 GB allocation, or exit 0 on complex
    assert_one_line_error(*done, "adapter_model.bin", why)
    assert snapshot(adapter) == before


# ----------------------------------------------------------------------------- output: markup and size

@pytest.mark.parametrize("field, value", [("base_model_name_or_path", "[/]"), ("modules_to_save", ["[/]"]),
                                          ("base_model_name_or_path", "[bold]x[/bold] \\")])
def test_markup_in_user_strings_renders_literally(adapter: Path, field: str, value: object) -> None:
    edit_config(adapter, **{field: value})
    code, out, err = cli("inspect", adapter)  # before: rich.errors.MarkupError, exit 1
    assert code in (0, 1) and "Traceback" not in out + err, err
    if field == "base_model_name_or_path":
        assert value in out  # shown as written, not interpreted


def test_markup_in_a_tensor_key(adapter: Path) -> None:
    w = adapter / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(w)).items()}
    tensors["base_model.model.[/]weird.weight"] = torch.zeros(2)
    save_file(tensors, str(w))
    code, out, err = cli("inspect", adapter)  # before: rich.errors.MarkupError from the modules table
    assert code in (0, 1) and "Traceback" not in out + err and out.rstrip().endswith("inspect: OK"), err


def test_tensor_over_2_gib_is_read_in_chunks(adapter: Path) -> None:
    """A modules_to_save embedding of 2.2 GB (sparse on disk): one pread stops near 2 GiB, lorafit reads on."""
    w = adapter / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(w)).items()}
    edit_config(adapter, modules_to_save=["embed_tokens"])
    rows, dim = 550_000, 1000  # 550M float32 = 2.2 GB
    header = {k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in tensors.items()}
    big = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    header[big] = {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, 0]}
    pos, order = 0, [*tensors, big]
    for k in order:
        n = 4 * rows * dim if k == big else tensors[k].numel() * 4
        header[k]["data_offsets"] = [pos, pos + n]
        pos += n
    raw = json.dumps(header).encode()
    with open(w, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in tensors:
            f.write(tensors[k].contiguous().numpy().tobytes())
        f.truncate(8 + len(raw) + pos)  # the big tensor: zeros, as a hole
    code, out, err = cli("inspect", adapter, "--json")  # before: "truncated", exit 2
    assert code in (0, 1), err
    rows_out = {m["path"]: m for m in json.loads(out)["modules"]}
    assert rows_out[big]["out"] == [rows, dim] and rows_out[big]["health"] == "ok"


def test_a_path_too_long_for_the_os_is_a_plain_error(tmp_path: Path) -> None:
    """Sniffing the adapter's format must not turn ENAMETOOLONG into the catch-all."""
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # over PATH_MAX in all, each name fine
    assert_one_line_error(*cli("inspect", deep), "no such adapter directory")
    wide = tmp_path / ("x" * 300)  # one name over NAME_MAX
    assert_one_line_error(*cli("inspect", wide), "cannot be looked up (File name too long)")


def test_a_base_name_too_long_for_the_os_is_a_plain_error(adapter: Path, tmp_path: Path) -> None:
    assert_one_line_error(*cli("check", adapter, "--base", tmp_path / ("x" * 300)),
                          "cannot be looked up (File name too long)")


def test_a_zero_rank_in_rank_pattern_is_refused(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    """PEFT refuses r=0 ("`r` should be a positive integer value"); merge once divided by it."""
    edit_config(adapter, rank_pattern={"q_proj": 0})
    before = snapshot(adapter)
    assert_one_line_error(*cli("merge", adapter, "--base", bases["llama"], "-o", tmp_path / "out"),
                          "adapter_config.json", "rank_pattern['q_proj'] must be a positive rank")
    assert snapshot(adapter) == before and not (tmp_path / "out").exists()
