"""For users' own test suites: `assert_lands(adapter, base)` fails a pytest test with lorafit's findings.

    from lorafit.testing import assert_lands

    def test_adapter_lands():
        assert_lands("out/adapter", "meta-llama/Llama-3.2-1B", class_name="AutoModelForCausalLM")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import Adapter
from .report import Report


def assert_lands(adapter: Adapter | str | Path, base: str | Path | Any, class_name: str | type | None = None,
                 load: bool = False, runtimes: list[str] | None = None) -> Report:
    """Assert that `adapter` lands on `base` loaded as `class_name`, as `lorafit check` judges it.

    Args:
        load: also load the base's weights and the adapter with stock PEFT and prove every tensor (lorafit verify).
        runtimes: also judge these serving runtimes (e.g. ["vllm", "llama.cpp"]), as `check --runtime` does.
    Returns:
        the (last) Report, when every judgement is clean.
    Raises:
        AssertionError: a judgement found an error; the message lists each error finding and its fix.
        LorafitError: bad input (an unreadable adapter, a base not found locally).
    """
    from .api.check import check

    reports = [check(adapter, base, class_name)]
    if runtimes:
        from .api.runtimes import check_runtimes

        reports.append(check_runtimes(adapter, runtimes, base=base if isinstance(base, (str, Path)) else None))
    if load:
        from .api.load import verify_pretrained

        reports.append(verify_pretrained(adapter, base, class_name))
    errors = [f for r in reports for f in r.errors()]
    if errors:
        lines = [f"{f.code}: {f.message}" + (f"\n    fix: {f.hint}" if f.hint else "") for f in errors]
        raise AssertionError(f"{adapter} does not land on {base}:\n  " + "\n  ".join(lines))
    return reports[-1]
