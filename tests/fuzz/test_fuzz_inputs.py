"""Hypothesis mutates each untrusted input kind and runs the commands that read it; every example must keep
the invariant (tests/fuzz/invariant.py).

Bounded for `make test`: a few dozen derandomized examples per kind (the "lorafit" profile of tests/conftest.py),
no shrinking (a hang would be shrunk one deadline at a time), so a failure shows the first example that broke
the rule. `make fuzz` (tools/fuzz.py) runs the same strategies for minutes, randomized, with shrinking.
"""

from __future__ import annotations

import os
from pathlib import Path

import fuzz_fixtures
import pytest
from fuzz_case import Case
from hypothesis import HealthCheck, Phase, given, settings
from invariant import check_case
from mutators import KINDS, cases

EXAMPLES = int(os.environ.get("LORAFIT_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fixtures(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> fuzz_fixtures.Fixtures:
    return fuzz_fixtures.shared(tmp_path_factory.mktemp("fuzz"), bases["llama"])


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_input_keeps_the_invariant(kind: str, fixtures: fuzz_fixtures.Fixtures) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(case=cases(kind))
    def prop(case: Case) -> None:
        check_case(case, fixtures)

    prop()
