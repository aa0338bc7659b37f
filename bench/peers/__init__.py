"""Peer benchmarks: the headline workloads of metacore written idiomatically in PyTorch (eager,
and torch.func + vmap) and JAX (jit + vmap), timed in subprocesses pinned to the same cores.

Modules:
    workloads   inputs, the float64 ground truth, FLOP counts and the metacore calls
    torch_impl  the same computations in PyTorch (eager and torch.func)
    jax_impl    the same computations in JAX (jit + vmap)
    child       one (framework, workload, threads) measurement in its own process:
                builds the call, checks its result against the ground truth, then times it
    runner      pins the children with taskset and collects their JSON lines

Entry point: `python -m bench` (bench/__main__.py) writes BENCHMARKS.md.
"""
