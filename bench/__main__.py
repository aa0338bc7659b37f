"""`python -m bench`: metacore against PyTorch and JAX on the headline workloads; writes
BENCHMARKS.md (see bench/peers/). `python -m bench --quick` runs the quick subset on one
thread; `--list` names the workloads; `--python PATH` picks an interpreter that has torch
and jax for the peer columns (they say "not installed" otherwise). The full run also
measures the peak memory of second-order MAML against k (bench/peers/memory.py; `--memory`
adds it to a --quick / --only run, `--no-memory` leaves it out, `--memory-only` runs just it).

main(argv) is the entry point `metacore bench` calls.
"""
import sys

from bench.peers.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
