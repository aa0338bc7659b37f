"""Non-finite losses and gradients are never returned silently (policy and checks).

The implementation lives in metacore.kernels._nonfinite (NumPy only, so that the fused
kernels can use it without importing metacore); this module is its public face:

    metacore.nonfinite.set_policy('raise' | 'warn')   (or METACORE_NONFINITE=warn)
    with metacore.nonfinite.policy('warn'): ...

'raise' (default): FloatingPointError naming the op, the dtype and a likely cause;
'warn': NonFiniteWarning (a RuntimeWarning) and the values are returned. Checked at the
boundary of: the fused kernels (metacore.kernels.mlp_maml), Model.loss / loss_and_grad / hvp,
and the algorithms' gradient functions (maml_gradient, fomaml_gradient, reptile_direction,
...). The trainer always stops on a non-finite meta-gradient (metacore.training).
"""
from metacore.kernels._nonfinite import (ENV, POLICIES, NonFiniteWarning, all_finite,  # noqa: F401
                                         check_outputs, get_policy, likely_cause, policy,
                                         report, set_policy)


def check_loss_grad(op, loss, grad, hint="learning rate"):
    """The boundary check of an algorithm's loss-and-gradient entry point: nothing when both
    are finite (one summation pass each), else report(...) per the policy."""
    if not (all_finite(loss) and all_finite(grad)):
        import numpy as np
        report(op, np.asarray(grad).dtype, {"loss": np.asarray(loss), "gradient": grad},
               hint=hint)
