"""``--cpus N`` for every benchmark: the run on all cores, then the same run pinned to N
cores (``os.sched_setaffinity``, inherited by every process the benchmark starts: the
box, its baselines, its load), both printed. One core is a rough stand-in for a Pi 4,
whose cores are several times slower than a laptop's.

Use: ``add_option(parser)`` beside the benchmark's own options, then
``run(main, args)`` instead of calling ``main(args)``; or, for a ``main()`` that parses
``sys.argv`` itself (with ``add_option`` in its parser), ``run_main(main)``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

__all__ = ["add_option", "run", "run_main"]

_PINNED_ENV = "BENCH_PINNED_CPUS"


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus", type=int, default=0, metavar="N",
                        help="also run pinned to N cores (1: a rough stand-in for a Pi 4) and print both runs")


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """``main(args)`` on all cores; with ``--cpus N``, then again in a child process pinned
    to the first N cores this process may use. In that child, only the pinned run."""
    _both(lambda: main(args), args.cpus)


def run_main(main: Callable[[], object]) -> None:
    """:func:`run` for a ``main()`` that parses the command line itself."""
    parser = argparse.ArgumentParser(add_help=False)
    add_option(parser)
    known, _ = parser.parse_known_args()
    _both(main, known.cpus)


def _both(main: Callable[[], object], cpus: int) -> None:
    pinned = os.environ.get(_PINNED_ENV)
    if pinned:
        cores = sorted(os.sched_getaffinity(0))[:int(pinned)]
        os.sched_setaffinity(0, cores)
        print(f"== pinned to {len(cores)} core(s): {cores} ==", flush=True)
        main()
        return
    if not cpus:
        main()
        return
    print(f"== all {len(os.sched_getaffinity(0))} core(s) ==", flush=True)
    main()
    sys.stdout.flush()
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else "benchmarks"
    argv = _without_cpus(sys.argv[1:])
    subprocess.run([sys.executable, "-m", name, *argv], env={**os.environ, _PINNED_ENV: str(cpus)}, check=True)


def _without_cpus(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--cpus":
            skip = True
        elif not arg.startswith("--cpus="):
            out.append(arg)
    return out
