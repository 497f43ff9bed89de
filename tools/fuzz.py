"""Fuzz lorafit's five commands for a while: `make fuzz` (10 minutes), `make fuzz FUZZ_SECONDS=60`.

Runs the strategies of tests/fuzz/mutators.py randomized (not the derandomized profile of `make test`), in
batches round-robin over the input kinds, judging every example with tests/fuzz/invariant.py. A violation
is shrunk by hypothesis for at most --shrink-seconds (a hang is not shrunk: each try would cost a deadline)
and saved to tests/fuzz/corpus/ unless one with the same signature is there already; `make test` replays it.
Prints the examples run per input kind and command, the violations and the elapsed time; exits 1 if any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fuzz"), str(ROOT / "tests")]

import fuzz_fixtures  # noqa: E402  (conftest, imported by it, sets the offline environment first)
from fuzz_case import COMMANDS, Case, dump_record  # noqa: E402
from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from invariant import InvariantViolation, Outcome, run_case  # noqa: E402
from mutators import KIND_COMMANDS, KINDS, cases  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz" / "corpus"


class Stop(BaseException):
    """Ends a hypothesis run early (time is up, or a hang must not be shrunk); hypothesis lets it through."""


def signature(case: Case, outcome: Outcome) -> str:
    """The first violation with the case's paths, numbers and quoted text blanked: one bug, one signature."""
    line = outcome.violations[0]
    line = re.sub(r"/\S*", "<path>", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "<q>", line)
    line = re.sub(r"\d+", "<n>", line)
    return f"{case.kind} {case.command}: {line}"


def known_signatures() -> set[str]:
    return {json.loads(p.read_text()).get("signature", "") for p in CORPUS.glob("*.json")}


def save(case: Case, outcome: Outcome, sig: str) -> Path:
    digest = hashlib.sha256(json.dumps(case.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    path = CORPUS / f"fuzz-{case.kind}-{case.command}-{digest}.json"
    record = case.to_json() | {"note": outcome.violations[0][:300], "found_by": f"tools/fuzz.py {time.strftime('%F')}",
                               "signature": sig}
    path.write_text(dump_record(record))
    return path


class Fuzzer:
    def __init__(self, fixtures: fuzz_fixtures.Fixtures, stop_at: float, shrink_seconds: float, batch: int,
                 save_to_corpus: bool, max_saved: int) -> None:
        self.fx, self.stop_at, self.shrink_seconds, self.batch = fixtures, stop_at, shrink_seconds, batch
        self.save_to_corpus, self.max_saved = save_to_corpus, max_saved
        self.examples: Counter[tuple[str, str]] = Counter()
        self.failing_examples = 0
        self.found: dict[str, tuple[Case, Outcome, str]] = {}  # signature -> (case, outcome, corpus file or "")
        self.seen = known_signatures()

    def batch_of(self, kind: str) -> None:
        """One hypothesis run of `batch` examples of `kind`; records the (shrunk) failing case if any."""
        failing: list[tuple[Case, Outcome]] = []
        first_failure = [0.0]

        @settings(max_examples=self.batch, deadline=None, derandomize=False, database=None,
                  phases=[Phase.generate, Phase.shrink], verbosity=Verbosity.quiet, report_multiple_bugs=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(kind))
        def prop(case: Case) -> None:
            now = time.monotonic()
            if now > self.stop_at or (failing and now - first_failure[0] > self.shrink_seconds):
                raise Stop()
            outcome = run_case(case, self.fx)
            self.examples[(kind, case.command)] += 1
            if outcome.violations:
                self.failing_examples += 1
                if not failing:
                    first_failure[0] = now
                failing.append((case, outcome))
                if outcome.timed_out:
                    raise Stop()
                raise InvariantViolation(outcome.violations[0])

        try:
            prop()
        except (Stop, InvariantViolation):
            pass
        if failing:
            self.record(*failing[-1])

    def record(self, case: Case, outcome: Outcome) -> None:
        sig = signature(case, outcome)
        if sig in self.found:
            return
        saved = ""
        if self.save_to_corpus and sig not in self.seen and len(self.found) < self.max_saved:
            saved = str(save(case, outcome, sig).relative_to(ROOT))
        self.found[sig] = (case, outcome, saved)
        print(f"[{time.strftime('%T')}] violation: {sig}" + (f" -> {saved}" if saved else ""), flush=True)

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            for kind in KINDS:
                if time.monotonic() < self.stop_at:
                    self.batch_of(kind)

    def summary(self, elapsed: float) -> str:
        width = max(map(len, COMMANDS))
        lines = [f"lorafit fuzz: {sum(self.examples.values())} examples in {elapsed:.0f} s "
                 f"({os.cpu_count()} cores)", "examples run per input kind and command:",
                 f"  {'':16}" + "".join(f"{c:>{width + 2}}" for c in COMMANDS) + f"{'total':>9}"]
        for kind in KINDS:
            row = [self.examples[(kind, c)] if c in KIND_COMMANDS[kind] else "-" for c in COMMANDS]
            total = sum(self.examples[(kind, c)] for c in COMMANDS)
            lines.append(f"  {kind:16}" + "".join(f"{x:>{width + 2}}" for x in row) + f"{total:>9}")
        lines.append(f"violations: {len(self.found)} distinct, {self.failing_examples} failing examples "
                     "(shrinking included)")
        for sig, (case, outcome, saved) in self.found.items():
            where = saved or ("already in the corpus" if sig in self.seen else "not saved")
            lines.append(f"  {case.kind}/{case.command}{' --json' * case.as_json}: {outcome.violations[0][:200]}")
            lines.append(f"      {where}")
        lines.append(f"elapsed: {elapsed:.1f} s")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 600)))
    parser.add_argument("--batch", type=int, default=50, help="examples per hypothesis run (default 50)")
    parser.add_argument("--shrink-seconds", type=float, default=30, help="time to shrink one failure (default 30)")
    parser.add_argument("--max-saved", type=int, default=25, help="new corpus files per run at most (default 25)")
    parser.add_argument("--no-save", action="store_true", help="report violations, write nothing to the corpus")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorafit-fuzz-") as tmp:
        fx = fuzz_fixtures.build(Path(tmp))
        fuzzer = Fuzzer(fx, start + args.seconds, args.shrink_seconds, args.batch, not args.no_save, args.max_saved)
        try:
            fuzzer.run()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(fuzzer.summary(time.monotonic() - start), flush=True)
    sys.stdout.flush()
    # A worker thread stuck in a hung call cannot be joined; exit without waiting for it.
    os._exit(1 if fuzzer.found else 0)


if __name__ == "__main__":
    main()
