"""One error hierarchy. cli.py maps it to exit codes: LorafitError -> 2, AdapterMismatchError and findings with
errors -> 1."""

from __future__ import annotations

from pathlib import Path


class LorafitError(Exception):
    """Bad input or usage: the message names the file and says what to do. Exit code 2."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def at(self, path: str | Path) -> LorafitError:
        """The same error, naming `path` (for an error raised by code that does not know the file)."""
        return self if self.path else type(self)(self.message, path)


class AdapterNotFoundError(LorafitError):
    """The adapter directory, its config or its weights file does not exist."""


class AdapterFormatError(LorafitError):
    """The adapter exists but cannot be read: bad JSON, unknown peft_type, corrupt tensors."""


class CheckpointFormatError(LorafitError):
    """A model checkpoint (a base or a merged model) exists but a shard cannot be read."""


class ModelNotFoundError(LorafitError):
    """The base model is neither a local directory nor in the local HF cache."""


class UnknownClassError(LorafitError):
    """The --class name is not a transformers model class."""


class OutputExistsError(LorafitError):
    """The output directory exists and --force was not given."""


class AdapterMismatchError(LorafitError):
    """The adapter does not land on the model: tensors dropped, left at init, or not bit-equal.

    Unlike the other LorafitErrors this is a finding about the adapter, not bad input: the CLI exits 1 for it.
    `report` is the lorafit Report (or None) and `problems` the list of human-readable problems.
    """

    def __init__(self, message: str, problems: list[str] | None = None, report: object | None = None) -> None:
        self.problems = problems or []
        self.report = report
        lines = [message] + [f"  - {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        super().__init__("\n".join(lines))

    def at(self, path: str | Path) -> LorafitError:
        return self  # the message already names the adapter
