"""Meta-batches across processes and hosts over MPI (mpi4py): `mpirun -n R metacore train ...
--distributed`.

A meta-batch is embarrassingly parallel. Every rank draws the same full meta-batch (the task
generator's state is the same everywhere), keeps its own contiguous block of tasks (the rule is
`task_blocks`), and computes the mean meta-gradient over that block. One Allreduce of the flat
vector w_r * g_r, with w_r = T_r / T, gives every rank the mean over all T tasks; the loss and
accuracy sums, and the method's buffers (batch-norm running statistics, which each rank moved
toward its own block's statistics), ride in a second, small float64 Allreduce of the same
weights. The outer optimizer then runs identically on every rank, so the parameters never need
to be sent. Rank 0 alone writes metrics and checkpoints.

Communication per meta-step: one parameter vector (P floats) plus a few metrics (and, for a
method with batch-norm buffers, 2 floats per BN channel), whatever R is.
Only the order of the floating-point sums differs from a single process, so parameters agree
to rounding (about 1e-15 relative per step), not bit for bit; with Adam, except entries whose
gradient is zero but for rounding (a conv bias before batch norm), which Adam's g / sqrt(v)
turns into real steps in any summation order (docs/DISTRIBUTED.md).

A rank that dies: Open MPI's mpirun notices the lost process and ends every other rank with an
error naming it (ORTE's default "abort the job when a process exits abnormally"), so the job
does not hang in a collective; checkpoints are written atomically by rank 0, so the last one
stays valid. A rank that raises is different: alone, it would wait in MPI_Finalize while the
others wait in the next Allreduce, forever; `abort_on_error` prints its traceback and calls
MPI_Abort, which ends every rank. Nothing here unpickles: only the upper-case, buffer-based
mpi4py calls are used.

Every rank must start from the same step and parameters (`check_same_start`): across hosts the
run directory must be on a file system they all share, or a resumed run would restart from
step 0 on the hosts that cannot see rank 0's checkpoint.
"""
import contextlib
import hashlib
import shutil
import sys
import traceback

import numpy as np

from metacore.taskpool import block_bounds


class SingleProcess:
    """The communicator of a run without MPI: rank 0 of 1, every collective the identity."""
    rank, size = 0, 1

    def allreduce_sum(self, x):
        return x

    def barrier(self):
        pass


def mpi_unavailable():
    """None when `mpirun` and mpi4py are both here, else what is missing and how to get it
    (what the MPI tests and bench/bench_distributed.py skip with)."""
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install 'metacore[mpi]')"
    return None


class MPIComm:
    """COMM_WORLD through mpi4py, with the few collectives the trainer needs."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(
                "--distributed needs mpi4py and an MPI library: apt-get install openmpi-bin "
                "libopenmpi-dev, then pip install 'metacore[mpi]' (mpi4py); "
                f"import failed: {e}") from e
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.comm.Set_errhandler(MPI.ERRORS_ARE_FATAL)   # a failed collective ends the job
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_sum(self, x):
        """Elementwise sum over ranks of a contiguous float array; returns a new array."""
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self.MPI.SUM)
        return out

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code):
        self.comm.Abort(code)


# The exit status mpirun returns when one rank's error ended the job through MPI_Abort. It is
# not 1 (what a Python traceback gives) so that callers and tests can tell the two apart.
ABORT_EXIT_CODE = 70                                 # EX_SOFTWARE in BSD's sysexits.h


@contextlib.contextmanager
def abort_on_error(comm):
    """Run the block; if it raises on one rank of several, print the traceback and end the
    whole job (MPI_Abort, exit status ABORT_EXIT_CODE) instead of leaving the other ranks in a
    collective."""
    try:
        yield
    except BaseException:
        if comm.size > 1:
            sys.stderr.write(f"metacore --distributed: rank {comm.rank} of {comm.size} failed; "
                             f"aborting the job\n")
            traceback.print_exc()
            sys.stderr.flush()
            comm.abort(ABORT_EXIT_CODE)
        raise


def check_same_start(comm, step, params):
    """Raise (on every rank alike) unless all ranks hold the same step and parameters."""
    if comm.size == 1:
        return
    digest = int.from_bytes(hashlib.sha256(params.tobytes()).digest()[:6], "big")  # < 2**53
    mine = np.zeros((comm.size, 2))
    mine[comm.rank] = step, digest
    seen = comm.allreduce_sum(mine)                  # row r: rank r's (step, digest), exact
    bad = np.flatnonzero((seen != seen[0]).any(axis=1))
    if bad.size:
        r = int(bad[0])
        raise RuntimeError(f"train --distributed: rank {r} starts at step {int(seen[r, 0])}, "
                           f"rank 0 at step {int(seen[0, 0])}"
                           f"{' with other parameters' if seen[r, 0] == seen[0, 0] else ''}; "
                           f"every rank must read the same checkpoint, so across hosts --out "
                           f"must be on a file system they all share")


def task_blocks(T, R):
    """Rank r gets tasks [b[r], b[r+1]) of a T-task meta-batch: contiguous blocks whose sizes
    differ by at most one, the larger ones first (numpy.array_split's rule)."""
    if R > T:
        raise ValueError(f"--distributed: {R} ranks for a meta-batch of {T} tasks; every rank "
                         f"needs at least one task (use at most {T} ranks or a larger meta-batch)")
    return block_bounds(T, R)
