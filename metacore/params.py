"""One flat parameter vector per model, with named views into it.

theta: (P,) for one model, or (T, P) for T tasks whose parameters differ (MAML's adapted
weights). Inner-loop updates, Reptile steps, HVP directions and optimizer state are then single
vector operations, and a checkpoint is one array.
"""
import math

import numpy as np


class ParamLayout:
    """Ordered (name, shape) blocks laid end to end in one vector of `size` entries."""

    def __init__(self, blocks):
        self.names, self.shapes, self.offsets = [], [], []
        offset = 0
        for name, shape in blocks:
            if name in self.names:
                raise ValueError(f"ParamLayout: duplicate parameter name {name!r}")
            self.names.append(name)
            self.shapes.append(tuple(shape))
            self.offsets.append(offset)
            offset += math.prod(shape)
        self.size = offset

    def views(self, theta):
        """theta: (T, P) -> {name: (T, *shape) view}. Writing a view writes theta."""
        T = theta.shape[0]
        out = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            out[name] = theta[:, off:off + math.prod(shape)].reshape((T,) + shape)
        return out

    def slice(self, name):
        """The range of `name` in the flat vector."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + math.prod(self.shapes[i]))

    def describe(self):
        return [(n, s, o) for n, s, o in zip(self.names, self.shapes, self.offsets)]

    def __repr__(self):
        rows = ", ".join(f"{n}{list(s)}" for n, s in zip(self.names, self.shapes))
        return f"ParamLayout(size={self.size}: {rows})"


def tile_tasks(theta, T):
    """(P,) -> (T, P), a fresh copy per task (e.g. MAML's starting point for every task)."""
    return np.repeat(theta[None, :], T, axis=0)
