"""One derivation of `metacore check` (a Case), its groups and its default tolerances:
shared by metacore/check.py (layers, losses, models) and metacore/check_more.py (the other
groups), so that neither imports the other's module at the top.
"""

TOL = {  # (quantity, dtype) -> max rel_error allowed
    ("gradient", "float64"): 1e-7,
    ("hvp", "float64"): 1e-6,
    ("symmetry", "float64"): 1e-10,
    # float32: round-off of sums of a few hundred terms, ~2^-23 * a few hundred
    ("gradient", "float32"): 5e-5,
    ("hvp", "float32"): 5e-5,
}
# kernel backends against the reference on the same inputs: float64 differs only in the order
# of sums (~1e-16); float32 kernels accumulate in float32 where the reference uses float64
TOL[("backend", "float64")] = 1e-12
TOL[("backend", "float32")] = 5e-6       # measured worst 2.5e-7 (lrua_episode)
GROUPS = ("layers", "losses", "models", "meta-gradients", "kernels", "algorithms")
KIND_GROUP = {"layer": "layers", "loss": "losses", "model": "models"}
H_GRAD = 1e-5          # central-difference steps (float64)
H_HVP = 1e-5


class Case:
    """A differentiable scalar objective of named float arrays with analytic gradient and HVP.

    make(rng) -> dict of float64 inputs (the differentiation variables)
    value(inputs) -> the objective alone (what finite differences evaluate)
    grad_hvp(inputs, v=None) -> (value, {name: gradient}, {name: Hv} or None)
    blocks: for large inputs, a list of slices of the flat input (one per named parameter
    block); finite differences then check `per_block` random coordinates of every block.

    pattern(inputs): the model's ReLU masks and max-pool choices (None for smooth cases);
    the finite difference of the gradient is only valid if the pattern is the same at both
    ends of the step, so the step is shrunk until it is.

    group: one of GROUPS (default from kind); has_hvp: False where the project has no HVP
    or R-op for this derivation (gradient rows only); tol: {(quantity, dtype): bound}
    overriding TOL; backends(inputs, dtype) -> [(quantity, error)]: agreement of every
    available kernel backend with the reference (kernel rows).
    """

    def __init__(self, name, kind, make, value, grad_hvp, blocks=None, per_block=None,
                 pattern=None, group=None, has_hvp=True, tol=None, backends=None,
                 h_grad=None):
        self.name, self.kind, self.make, self.value, self.grad_hvp = name, kind, make, value, grad_hvp
        self.blocks, self.per_block, self.pattern = blocks, per_block, pattern
        self.group = group or KIND_GROUP[kind]
        self.has_hvp, self.tol, self.backends = has_hvp, dict(tol or {}), backends
        self.h_grad = H_GRAD if h_grad is None else h_grad

    def tolerance(self, quantity, dtype):
        return self.tol.get((quantity, dtype), TOL.get((quantity, dtype)))
