"""The one property every fuzz case must keep, whatever its input: the contract of README's "Commands" section.

- the exit code is 0, 1 or 2, and nothing escapes as a traceback;
- exit 2 is one line on stderr, "lorafit: error: ...", naming a file of the case; never the catch-all
  "unexpected ... please report it", which means no rule foresaw the input;
- the inputs are byte-for-byte unchanged, and no custom code from a model directory ran;
- OUT appears complete or not at all, with no staging directory left next to it;
- with --json, a report (exit 0 or 1) is one JSON document on stdout;
- the command ends within DEADLINE seconds and its memory stays bounded.
The same function judges hypothesis' examples, the corpus replay, the file-system cases and tools/fuzz.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzz_case import WRITES, Case, Inputs, argv, materialize
from safetensors import safe_open

from helpers import cli, snapshot

DEADLINE = float(os.environ.get("LORAFIT_FUZZ_DEADLINE", "10"))  # seconds; a tiny model needs well under 1
MAX_RSS_GROWTH_MB = float(os.environ.get("LORAFIT_FUZZ_MAX_RSS_MB", "2048"))
# Allocations beyond this fail with MemoryError instead of the kernel killing the whole run (/dev/zero, huge shapes).
DATA_CAP_MB = float(os.environ.get("LORAFIT_FUZZ_DATA_CAP_MB", "4096"))
MARKER_ENV = "LORAFIT_FUZZ_MARKER"  # custom code planted by a case writes this file if it ever runs


class ExampleTimeout(BaseException):
    """Raised by SIGALRM in the main thread; a BaseException so that no `except Exception` in lorafit eats it."""


class InvariantViolation(AssertionError):
    """The first line of the message is the first violation: what the corpus and the summary show."""


@dataclass
class Outcome:
    args: list[str]
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    rss_growth_mb: float = 0.0
    timed_out: bool = False
    violations: list[str] = field(default_factory=list)

    def report(self, case: Case) -> str:
        return "\n".join([*self.violations, f"  lorafit {' '.join(self.args)}", f"  exit {self.exit_code} after "
                          f"{self.seconds:.2f} s; stderr: {self.stderr.strip()[:500]!r}", f"  case: {case!r}"])


def check_case(case: Case, fixtures: Any, deadline: float = DEADLINE) -> Outcome:
    """Run `case`; returns its Outcome. Raises InvariantViolation listing every broken rule."""
    outcome = run_case(case, fixtures, deadline)
    if outcome.violations:
        raise InvariantViolation(outcome.report(case))
    return outcome


def run_case(case: Case, fixtures: Any, deadline: float = DEADLINE) -> Outcome:
    """Materialize `case` in a fresh directory below fixtures.scratch, run it in-process, judge it, clean up."""
    root = Path(tempfile.mkdtemp(prefix="case-", dir=fixtures.scratch))
    try:
        where = materialize(case, fixtures, root)
        return _judge(case, where, deadline)
    finally:
        _unblock_fifos(root)
        shutil.rmtree(root, ignore_errors=True)


def _judge(case: Case, where: Inputs, deadline: float) -> Outcome:
    out = Outcome(argv(case, where))
    before = snapshot(where.root, skip=where.out.parent)
    marker = where.root / "PWNED"
    rss0 = _maxrss_mb()
    start = time.monotonic()
    result = None
    try:
        with _deadline(deadline, where.root), _data_cap(DATA_CAP_MB):
            result = cli(*out.args, env={MARKER_ENV: str(marker)}, catch=True)
    except ExampleTimeout as e:
        out.timed_out = True
        out.violations.append(f"did not finish within {deadline:.0f} s{_where(e)}")
    out.seconds = time.monotonic() - start
    out.rss_growth_mb = _maxrss_mb() - rss0
    if result is not None:
        out.exit_code, out.stdout, out.stderr = result
        out.violations += _output_rules(case, where, result)
    if out.rss_growth_mb > MAX_RSS_GROWTH_MB:
        out.violations.append(f"peak memory grew by {out.rss_growth_mb:.0f} MB")
    if marker.exists():
        out.violations.append("custom code from the model directory ran (it wrote its marker file)")
    changed = _diff(before, snapshot(where.root, skip=where.out.parent))
    if changed:
        out.violations.append(f"inputs changed: {', '.join(changed[:5])}")
    out.violations += _out_rules(case, where, out.exit_code)
    return out


def _output_rules(case: Case, where: Inputs, result: Any) -> list[str]:
    v = []
    code, text, err = result.code, result.output, result.err
    exc = result.exception  # what escaped the CLI (cli() never puts SystemExit here)
    if exc is not None:
        v.append(f"uncaught {type(exc).__name__}: {_first(str(exc))}{_where(exc)}")
    if code not in (0, 1, 2):
        v.append(f"exit code {code}, not 0, 1 or 2")
    if "Traceback" in text:
        v.append("a traceback in the output")
    if "please report it" in text:
        line = next(x for x in text.splitlines() if "please report it" in x)
        v.append(f"catch-all error: {line[:300]}")
    if code == 2:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("lorafit: error: "):
            v.append(f"exit 2 without exactly one 'lorafit: error: ' line on stderr: {err.strip()[:300]!r}")
        elif not any(r in lines[0] for r in {str(where.root), str(where.root.resolve())}):
            v.append(f"exit 2 error names no file of the case: {lines[0][:300]}")
    if case.as_json and code in (0, 1):
        try:
            json.loads(result.out)
        except ValueError as e:
            v.append(f"--json printed no JSON document ({e}): {result.out[:200]!r}")
    if case.expect_exit is not None and code not in case.expect_exit:
        v.append(f"exit {code}, expected {' or '.join(map(str, case.expect_exit))}")
    return v


def _out_rules(case: Case, where: Inputs, code: int | None) -> list[str]:
    """OUT exists only complete and only after exit 0 or 1; nothing else is left next to it."""
    v = [f"left {p.name} next to OUT" for p in sorted(where.out.parent.iterdir()) if p != where.out]
    if os.path.lexists(where.out):
        if code not in (0, 1):
            v.append(f"OUT exists after exit {code}")
        problem = _incomplete(case, where.out)
        if problem:
            v.append(f"OUT is incomplete: {problem}")
    elif case.command in WRITES and code == 0:
        v.append("exit 0 but OUT was not written")
    return v


def _incomplete(case: Case, out: Path) -> str | None:
    """Why OUT is not a complete adapter (fix) or model (merge), or None."""
    try:
        config = out / ("adapter_config.json" if case.command == "fix" else "config.json")
        if not isinstance(json.loads(config.read_text()), dict):
            return f"{config.name} is not a JSON object"
        if case.command == "fix":
            files = [out / "adapter_model.safetensors"]
        elif (out / "model.safetensors.index.json").exists():
            index = json.loads((out / "model.safetensors.index.json").read_text())
            files = [out / f for f in sorted(set(index["weight_map"].values()))]
        else:
            files = [out / "model.safetensors"]
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
    except Exception as e:  # any failure to read it back is the finding
        return f"{type(e).__name__}: {_first(str(e))}"
    return None


# ----------------------------------------------------------------------------- helpers


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{k} {'added' if k not in before else 'removed' if k not in after else 'modified'}"
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]


def _first(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _where(exc: BaseException) -> str:
    """' in lorafit/x.py:12 (innermost.py:34)': where the exception came from, to tell one bug from another."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]  # not the alarm handler
    ours = [f for f in frames if "/lorafit/" in f.filename]
    parts = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in (ours[-1:] + frames[-1:])]
    return f" in {parts[0]}" + (f" ({parts[1]})" if len(parts) > 1 and parts[1] != parts[0] else "") if parts else ""


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vmdata() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def _data_cap(extra_mb: float) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _vmdata() + int(extra_mb * 2**20)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextmanager
def _deadline(seconds: float, root: Path) -> Iterator[None]:
    """SIGALRM raises ExampleTimeout in the main thread; a timer then opens any FIFO below `root` for writing,
    so that a worker thread blocked opening one is released too."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise ExampleTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    timer = threading.Timer(seconds + 1, _unblock_fifos, (root,))
    timer.daemon = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    timer.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        timer.cancel()


def _unblock_fifos(root: Path) -> None:
    """Open and close every FIFO below `root` read-write: whoever waits to open one goes on, and reads EOF."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    os.close(os.open(p, os.O_RDWR | os.O_NONBLOCK))
            except OSError:
                pass
