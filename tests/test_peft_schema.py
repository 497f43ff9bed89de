"""lorafit.peft_schema reads PEFT's sources with `ast`; the imported classes are the oracle."""

from __future__ import annotations

import dataclasses
import json

import peft
from peft import LoraConfig

from lorafit.formats.peft.schema import lora_config_fields, peft_types, peft_version


def test_lora_config_fields_are_exactly_the_init_fields_of_loraconfig() -> None:
    # adapter_config.json is turned back into LoraConfig(**fields): the fields a config may carry are the init
    # fields. A non-init field or a ClassVar picked up by the parse would show as a difference here.
    fields = dataclasses.fields(LoraConfig)
    init_fields = {f.name for f in fields if f.init}
    assert lora_config_fields() == frozenset(init_fields)
    assert init_fields == {f.name for f in fields}  # if PEFT adds a non-init field, this says which rule applies


def test_saved_config_of_fresh_adapter_holds_no_unknown_field(tmp_path) -> None:
    # What PEFT itself writes must never be flagged as unknown-config-field.
    LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) <= lora_config_fields()
    assert {"r", "lora_alpha", "target_modules", "peft_type", "use_dora", "rank_pattern"} <= set(saved)


def test_peft_types_are_the_members_of_peft_peftype() -> None:
    assert peft_types() == frozenset(m.name for m in peft.PeftType)
    # The reader compares the JSON value of peft_type, so the values must be the same set.
    assert peft_types() == frozenset(m.value for m in peft.PeftType)
    assert "LORA" in peft_types() and "IA3" in peft_types()


def test_peft_version_is_the_installed_one() -> None:
    assert peft_version() == peft.__version__
