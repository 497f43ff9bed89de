"""`python -m lorafit`: the same CLI as the `lorafit` command."""

from .cli import main

if __name__ == "__main__":  # importing the module (pkgutil, docs tools) must not run the CLI
    main()
