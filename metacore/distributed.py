"""Meta-batches across processes and hosts over MPI (mpi4py): `mpirun -n R metacore train ...
--distributed`.

A meta-batch is embarrassingly parallel. Every rank draws the same full meta-batch (the task
generator's state is the same everywhere), keeps its own contiguous block of tasks (the rule is
`task_blocks`), and computes the mean meta-gradient over that block. One Allreduce of the flat
vector w_r * g_r, with w_r = T_r / T, gives every rank the mean over all T tasks; the loss and
accuracy sums ride in a second, tiny Allreduce. The outer optimizer then runs identically on
every rank, so the parameters never need to be sent. Rank 0 alone writes metrics and checkpoints.

Communication per meta-step: one parameter vector (P floats) plus a few metrics, whatever R is.
Only the order of the floating-point sums differs from a single process, so parameters agree
to rounding (about 1e-15 relative per step), not bit for bit.

A rank that dies: Open MPI's mpirun notices the lost process and ends every other rank with an
error naming it (ORTE's default "abort the job when a process exits abnormally"), so the job
does not hang in a collective; checkpoints are written atomically by rank 0, so the last one
stays valid. Nothing here unpickles: only the upper-case, buffer-based mpi4py calls are used.
"""
import numpy as np


class SingleProcess:
    """The communicator of a run without MPI: rank 0 of 1, every collective the identity."""
    rank, size = 0, 1

    def allreduce_sum(self, x):
        return x

    def barrier(self):
        pass


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


def task_blocks(T, R):
    """Rank r gets tasks [b[r], b[r+1]) of a T-task meta-batch: contiguous blocks whose sizes
    differ by at most one, the larger ones first (numpy.array_split's rule)."""
    if R > T:
        raise ValueError(f"--distributed: {R} ranks for a meta-batch of {T} tasks; every rank "
                         f"needs at least one task (use at most {T} ranks or a larger meta-batch)")
    sizes = [T // R + (1 if r < T % R else 0) for r in range(R)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)
