"""`python -m qdpo`: the `qdpo` command, also what torchrun starts on every rank (`torchrun -m qdpo run ...`)."""

import os

from qdpo.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
