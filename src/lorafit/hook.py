"""`lorafit-hook COMMAND FILE...`: run `lorafit COMMAND` once per adapter directory among the files a hook runner
passes (pre-commit passes every adapter_config.json a commit touches). Exit: the worst of the runs (2 > 1 > 0)."""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = ("check", "inspect")


def adapter_dirs(files: list[str]) -> list[Path]:
    """The directories of the given adapter files, each once, in the order first named."""
    out: dict[Path, None] = {}
    for f in files:
        p = Path(f)
        out[p if p.is_dir() else p.parent] = None
    return list(out)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        sys.stderr.write(f"lorafit-hook: error: usage: lorafit-hook {{{','.join(COMMANDS)}}} [OPTIONS...] FILE...\n")
        return 2
    command, rest = args[0], args[1:]
    options = [a for a in rest if not _is_file(a)]
    files = [a for a in rest if _is_file(a)]
    from .cli import app

    worst = 0
    for directory in adapter_dirs(files):
        print(f"lorafit {command} {directory}", flush=True)
        try:
            returned = app([command, str(directory), *options], standalone_mode=False)
            code = returned if isinstance(returned, int) else 0
        except SystemExit as e:
            code = int(e.code or 0)
        except Exception as e:  # a usage error (click raises it when not standalone): one line, as the CLI says it
            show = getattr(e, "show", None)
            if show is None:
                raise
            show()
            code = 2
        worst = max(worst, code)
    return worst


def _is_file(arg: str) -> bool:
    return not arg.startswith("-") and Path(arg).name == "adapter_config.json"


if __name__ == "__main__":
    sys.exit(main())
