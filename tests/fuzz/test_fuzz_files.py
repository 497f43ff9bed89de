"""File-system oddities where a file is expected, under the same invariant, plus the valid baseline.

A FIFO must not block a command (the invariant's deadline fails the case if it does, and unblocks it), a
symlink to /dev/zero must not be read without end (the invariant caps memory), a directory is no file.
"""

from __future__ import annotations

from pathlib import Path

import fuzz_fixtures
import pytest
from fuzz_case import COMMANDS, Case
from invariant import check_case

DEADLINE = 5.0  # none of these needs more than a fraction of a second


def _case(command: str, rel: str, op: dict, base: str = "plain") -> Case:
    return Case(command, base=base, edits={rel: [op]}, kind="files", note=f"{rel}: {op}")


CONFIG, WEIGHTS = "adapter/adapter_config.json", "adapter/adapter_model.safetensors"
FIFO, ZERO, DIR = {"fifo": True}, {"symlink": "/dev/zero"}, {"mkdir": True}
FILE_CASES = {
    "adapter-config-fifo": _case("inspect", CONFIG, FIFO),
    "adapter-weights-fifo": _case("inspect", WEIGHTS, FIFO),
    "adapter-config-fifo-check": _case("check", CONFIG, FIFO),
    "base-config-fifo": _case("check", "base/config.json", FIFO),
    "base-weights-fifo-merge": _case("merge", "base/model.safetensors", FIFO),
    "shard-fifo-merge": _case("merge", "base/model-00002-of-00002.safetensors", FIFO, base="sharded"),
    "shard-index-fifo": _case("check", "base/model.safetensors.index.json", FIFO, base="sharded"),
    "merged-weights-fifo": _case("verify-merge", "merged/model.safetensors", FIFO),
    "adapter-dir-is-fifo": _case("inspect", "adapter", FIFO),
    "adapter-config-dev-zero": _case("inspect", CONFIG, ZERO),
    "adapter-weights-dev-zero": _case("inspect", WEIGHTS, ZERO),
    "base-config-dev-zero": _case("check", "base/config.json", ZERO),
    "shard-index-dev-zero": _case("merge", "base/model.safetensors.index.json", ZERO, base="sharded"),
    "adapter-config-is-dir": _case("inspect", CONFIG, DIR),
    "adapter-weights-is-dir": _case("inspect", WEIGHTS, DIR),
    "base-config-is-dir": _case("check", "base/config.json", DIR),
    "base-weights-is-dir": _case("merge", "base/model.safetensors", DIR),
    "adapter-config-dangling-link": _case("inspect", CONFIG, {"symlink": "nowhere.json"}),
    "adapter-config-link-loop": _case("inspect", CONFIG, {"symlink": "adapter_config.json"}),
}


@pytest.fixture(scope="module")
def fixtures(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> fuzz_fixtures.Fixtures:
    return fuzz_fixtures.shared(tmp_path_factory.mktemp("fuzz"), bases["llama"])


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("command", COMMANDS)
def test_valid_inputs_exit_0(fixtures: fuzz_fixtures.Fixtures, command: str, as_json: bool) -> None:
    """The fixtures every mutation starts from are clean: a violation of a mutated case is the mutation's."""
    assert check_case(Case(command, as_json), fixtures).exit_code == 0


@pytest.mark.parametrize("name", FILE_CASES)
def test_odd_file_keeps_the_invariant(fixtures: fuzz_fixtures.Fixtures, name: str) -> None:
    check_case(FILE_CASES[name], fixtures, deadline=DEADLINE)
