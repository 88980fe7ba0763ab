#!/usr/bin/env python
"""Copy the Python packages the GPU box lacks into runs/bench-site (git-ignored), to travel with the working tree.

    python benchmarks/pack_site.py            # then: run(..., carry=["runs/bench-site"])

The lent GPU machines have torch (CUDA), transformers, accelerate, peft, safetensors, tokenizers, pyarrow,
pandas, xxhash and psutil, but no bitsandbytes, trl or datasets, and no network. These are copied from this
machine's site-packages (installed files only, no bytecode); bitsandbytes keeps only the CUDA library that
matches the GPU box's torch (cu130 as last seen) and the CPU one: all of its builds together are ~125 MB, over
the 64 MiB a call may carry. multiprocess is built per Python version (here 3.11, there 3.12); it is pure
Python and imported by datasets, but if it fails there, carry a py312 wheel instead (README.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
from pathlib import Path

PACKAGES = ["bitsandbytes", "trl", "datasets", "dill", "multiprocess", "peft"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(Path(__file__).resolve().parent.parent / "runs" / "bench-site"))
    p.add_argument(
        "--cuda", default="130", help="which libbitsandbytes_cuda<N>.so to keep (torch.version.cuda there, no dot)"
    )
    p.add_argument("--packages", default=",".join(PACKAGES))
    a = p.parse_args()
    target = Path(a.target)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    total = 0
    for name in a.packages.split(","):
        dist = md.distribution(name)
        n = 0
        for f in dist.files or []:
            rel = str(f)
            if (
                ".." in rel
                or "__pycache__" in rel
                or rel.endswith(".pyc")
                or ".dist-info/" in rel
                and not rel.endswith("METADATA")
            ):
                continue
            if name == "bitsandbytes" and rel.endswith(".so") and not rel.endswith((f"_cuda{a.cuda}.so", "_cpu.so")):
                continue
            src = Path(dist.locate_file(f))
            if not src.is_file():
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            total += src.stat().st_size
            n += 1
        print(f"{name} {dist.version}: {n} files")
    print(f"{target}: {total / 2**20:.1f} MiB (a device call carries at most 64 MiB, the working tree included)")


if __name__ == "__main__":
    main()
