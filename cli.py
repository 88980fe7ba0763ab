"""Run qdpo from a checkout without installing it: `python cli.py run ...`."""

from qdpo.cli import main

if __name__ == "__main__":
    main()
