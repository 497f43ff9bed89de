"""Replay every input in tests/fuzz/corpus/ (crashes found so far, and the cases of the bug report) under the
strict invariant. A case stays in the corpus after its fix, so that the bug cannot come back."""

from __future__ import annotations

from pathlib import Path

import fuzz_fixtures
import pytest
from fuzz_case import load_case
from invariant import check_case

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.json"))


@pytest.fixture(scope="module")
def fixtures(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> fuzz_fixtures.Fixtures:
    return fuzz_fixtures.shared(tmp_path_factory.mktemp("fuzz"), bases["llama"])


def test_the_corpus_is_not_empty() -> None:
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_case_keeps_the_invariant(path: Path, fixtures: fuzz_fixtures.Fixtures) -> None:
    check_case(load_case(path), fixtures)
