"""--config KEY=VALUE (config_overrides=): the base as the user loads it, from_pretrained(base, num_labels=3). A
3-label head on a 2-label base is an error naming the field and the value; loaded that way it lands, verifies with
stock PEFT, and merges bit for bit as merge_and_unload does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json

SEQ = "AutoModelForSequenceClassification"


@pytest.fixture(scope="module")
def labels(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-label SEQ_CLS adapter (classifier in modules_to_save) and the same base saved with 2 labels."""
    root = tmp_path_factory.mktemp("labels")
    make_adapter(bases["bert"], SEQ, root / "a3", task_type="SEQ_CLS")  # the tiny bert has num_labels=3
    config = transformers.BertConfig.from_pretrained(bases["bert"])
    config.num_labels = 2
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "base2")
    return {"adapter": root / "a3", "base": root / "base2"}


def test_the_head_size_names_the_field_and_value(labels: dict[str, Path]) -> None:
    code, report = cli_json("check", labels["adapter"], "--base", labels["base"])
    assert code == 1
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [f["code"] for f in errors] == ["shape-mismatch"]
    assert "--config num_labels=3" in errors[0]["hint"] and "num_labels=3" in errors[0]["hint"]
    # stock PEFT agrees: on the 2-label base it fails on the head's size
    model = transformers.AutoModelForSequenceClassification.from_pretrained(labels["base"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(model, labels["adapter"])


def test_loaded_with_num_labels_it_lands_and_verifies(labels: dict[str, Path], tmp_path: Path) -> None:
    assert cli("check", labels["adapter"], "--base", labels["base"], "--config", "num_labels=3").code == 0
    code, report = cli_json("verify", labels["adapter"], "--base", labels["base"], "--config", "num_labels=3")
    assert code == 0, report
    assert cli("fix", labels["adapter"], "--base", labels["base"], "--config", "num_labels=3",
               "-o", tmp_path / "f").code == 0
    import lorafit

    assert lorafit.check(labels["adapter"], labels["base"], config_overrides={"num_labels": 3}).ok


def test_merge_with_num_labels_is_merge_and_unload(labels: dict[str, Path], tmp_path: Path) -> None:
    code, report = cli_json("merge", labels["adapter"], "--base", labels["base"], "--config", "num_labels=3",
                            "-o", tmp_path / "m")
    assert code == 0, report
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert len(config["id2label"]) == 3
    model = transformers.AutoModelForSequenceClassification.from_pretrained(labels["base"], num_labels=3,
                                                                            ignore_mismatched_sizes=True)
    expected = PeftModel.from_pretrained(model, labels["adapter"]).merge_and_unload().state_dict()
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[k], expected[k]) for k in merged)


@pytest.mark.parametrize("item", ["num_labels", "=3", "num labels=3"])
def test_bad_config_items(labels: dict[str, Path], item: str) -> None:
    code, out, err = cli("check", labels["adapter"], "--base", labels["base"], "--config", item)
    assert_one_line_error(code, out, err, "must look like KEY=VALUE")


def test_every_merged_file_is_whole(labels: dict[str, Path], tmp_path: Path) -> None:
    """With --config the head is written at the adapter's size (the layout once took the base's, and wrote a file
    whose header did not cover its data); forced without it, the base's head is kept and the finding says so."""
    cli("merge", labels["adapter"], "--base", labels["base"], "--config", "num_labels=3", "-o", tmp_path / "m")
    assert load_file(tmp_path / "m" / "model.safetensors")["classifier.weight"].shape == (3, 16)
    code, report = cli_json("merge", labels["adapter"], "--base", labels["base"], "-o", tmp_path / "f", "--force")
    assert code == 1 and "shape-mismatch" in {f["code"] for f in report["findings"]}
    assert load_file(tmp_path / "f" / "model.safetensors")["classifier.weight"].shape == (2, 16)
