"""Speed and memory benchmarks against named baselines, measured in one run.

Usage: python scripts/bench.py NAME [options]   (NAME: a module in deepunroll/bench/)
       python scripts/bench.py NAME --help
"""

import importlib
import pkgutil
import sys

import deepunroll.bench


def main() -> None:
    available = sorted(m.name for m in pkgutil.iter_modules(deepunroll.bench.__path__))
    if len(sys.argv) < 2 or sys.argv[1] not in available:
        sys.exit(f"usage: python scripts/bench.py {{{'|'.join(available)}}} [options]")
    importlib.import_module(f"deepunroll.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
