"""The version of lorafit, in a module of its own so that any layer can read it without importing the API; and the
installed versions of the libraries lorafit keys its caches on."""

from functools import cache

__version__ = "0.1.0"


@cache  # reading a dist's metadata parses its METADATA file (~5 ms): a scan asks thousands of times
def installed_version(dist: str) -> str | None:
    """The installed version of distribution `dist` (from its metadata, without importing it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
