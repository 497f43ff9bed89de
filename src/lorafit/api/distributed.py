"""Run lorafit's per-item work as Ray tasks: `scan --ray` (one task per chunk of adapters sharing a base) and
`merge --batch --ray` (one task per merge). A task calls the same function the local run calls, so results are the
same; a task whose worker dies is run again (its outputs are atomic, so a killed attempt leaves nothing in place).

Ray is imported only here and only when asked for: `lorafit --help` and every local command never load it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from ..errors import LorafitError

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'lorafit[ray]'"
# What a task must see as the driver does: lorafit's cache and switches, the HF cache (hub ids resolve only there)
# and offline mode (nothing is downloaded, on any node).
_FORWARDED = ("LORAFIT_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")


@dataclass(frozen=True)
class RayCluster:
    """Where `--ray` runs.

    address: None starts a local Ray instance (or joins the one RAY_ADDRESS names, as ray.init() does); otherwise
        what ray.init(address=...) takes: "auto", "local", "HOST:PORT", "ray://HOST:10001".
    retries: how many times a task whose worker process died is run again (Ray's max_retries).
    """

    address: str | None = None
    retries: int = 3


def import_ray() -> ModuleType:
    """The ray module. Raises LorafitError (one line, exit 2) when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise LorafitError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def forwarded_env() -> dict[str, str]:
    """The driver's LORAFIT_*, HF_*, HUGGINGFACE_* and TRANSFORMERS_* variables, which every task gets too."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)}


@contextmanager
def connected(cluster: RayCluster) -> Iterator[int]:
    """Connect to the cluster (or start a local instance) for the `with` block; yields the cluster's CPU count.

    A Ray already initialised in this process (a notebook, a test) is used as it is and left running; one this
    started is shut down on the way out, which also stops a local instance's processes.
    Raises:
        LorafitError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    started = False
    # Ray prints a dead worker's notice to stdout, where --json writes: while lorafit runs Ray, it goes to stderr
    with redirect_stdout(sys.stderr):
        if not ray.is_initialized():
            _check_reachable(cluster.address)
            try:
                # log_to_driver off: a worker's own prints must never reach stdout either
                ray.init(address=cluster.address or None, include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False, runtime_env={"env_vars": forwarded_env()})
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {cluster.address}" if cluster.address else "a local Ray instance"
                first = (str(e).splitlines() or [""])[0][:200]
                raise LorafitError(f"cannot start or reach {where}: {first}") from None
            started = True
        try:
            yield max(1, int(ray.cluster_resources().get("CPU", 1)))
        finally:
            if started:
                ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing listens on is refused in seconds: ray.init would retry it for
    minutes. Raises LorafitError when the port cannot be reached."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address or "")
    if m is None:
        return  # None, "auto", "local": Ray itself answers at once
    try:
        socket.create_connection((m[1], int(m[2])), timeout=10).close()
    except OSError as e:
        raise LorafitError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); is the head node up? "
                           "(ray start --head on it)") from None


def _apply(fn: Callable[[T], R], item: T) -> R:
    """The task body: `fn(item)`, in a worker process (fn travels pickled; lorafit's functions by reference)."""
    return fn(item)


def run_on_ray(fn: Callable[[T], R], items: Sequence[T], cluster: RayCluster,
               on_done: Callable[[int, R], None] | None = None,
               failed: Callable[[T, BaseException], R] | None = None) -> list[R]:
    """`[fn(item) for item in items]`, each call a Ray task, retried up to cluster.retries times if its worker dies.

    Args:
        fn: a picklable function of one item (a module-level function or a functools.partial of one).
        on_done: called on the driver as each task finishes, with the item's index and its result.
        failed: turns an item whose task failed for good (its worker died on every attempt, or fn raised) into a
            result; without it the first such failure raises.
    Returns:
        the results in the order of `items`.
    Raises:
        LorafitError: Ray is not installed or unreachable; a task failed for good and `failed` was not given.
    """
    with connected(cluster):
        ray = import_ray()
        # retry_exceptions off: an exception of fn is its answer (the same on every attempt); a dead worker is not
        remote = ray.remote(max_retries=cluster.retries, retry_exceptions=False)(_apply)
        if not _our_env():  # a Ray started by someone else: its workers get the driver's variables per task
            remote = remote.options(runtime_env={"env_vars": forwarded_env()})
        fn_ref = ray.put(fn)  # one copy in the object store, not one per task
        refs = [remote.remote(fn_ref, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(items)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        if failed is None:
                            raise LorafitError(f"a Ray task failed: {task_error(e)}") from None
                        results[i] = failed(items[i], e)
                    if on_done is not None:
                        on_done(i, results[i])
        except BaseException:
            # Ctrl-C, SIGTERM or a failure: the rest is cancelled (a KeyboardInterrupt in each running task, whose
            # staging directory is then removed as on a local Ctrl-C)
            for ref in pending:
                ray.cancel(ref)
            raise
        return results


def _our_env() -> bool:
    """Whether this job's workers were started with the driver's variables (the job's runtime_env, set by
    `connected`), so tasks need no runtime_env of their own (which would start a second set of workers)."""
    ray = import_ray()
    try:
        job_env = ray.get_runtime_context().runtime_env or {}
    except Exception:  # an older Ray without the runtime context's runtime_env
        return False
    return bool(job_env.get("env_vars") == forwarded_env())


def task_error(e: BaseException) -> str:
    """One line for a failed task: the exception fn raised (a RayTaskError's cause), or how the worker died."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:300]}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
