"""Entry point for ``accelerate launch peftlab/run.py RECIPE [key=value ...] [--resume|--overwrite]``.

The same as ``peftlab train RECIPE ...``; accelerate decides how many processes and devices.
"""

import os
import sys


def _main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    # Run as a script, Python puts peftlab/ itself first on sys.path; the package's parent belongs there.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    from peftlab.cli import main

    sys.argv[1:] = ["train", *sys.argv[1:]]
    return main()


if __name__ == "__main__":
    sys.exit(_main())
