"""MAML, first-order MAML and Reptile for a Linear-ReLU-...-Linear Model with MSE loss through
the fused kernel (metacore.kernels.mlp_maml): the adapter from a metacore Model to the
kernel's plain arguments, its layer widths.

The kernel takes sizes = (D, H_1, ..., O) and a flat parameter vector laid out layer by
layer as w then b, which is what Model's ParamLayout gives such a model (ReLU has no
parameters); mlp_sizes checks the model and reads its widths. Everything else (the arrays,
alpha, steps) goes to the kernel as it is, which checks it.

    mlp_maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False) -> query_loss (T,), grad (P,)
    mlp_reptile_direction(model, theta, support_x, support_y, alpha, steps=1)
        -> loss_0 (T,), d (P,)
    mlp_sizes(model) -> sizes (tuple of ints);  mlp_structure(model) -> dims, woff, boff

Shape letters: T tasks, P parameters, D input features, O outputs.
"""
from metacore.kernels import mlp_maml as _fused
from metacore.network import Linear, Model, ReLU

_sizes = {}     # what the widths depend on (layer types and widths, loss) -> sizes


def mlp_sizes(model, op="mlp_maml_gradient"):
    """-> (D, H_1, ..., O) for a Linear-ReLU-...-Linear model with loss 'mse' whose flat
    layout is the kernel's; a TypeError or ValueError naming the problem for any other.
    Remembered by value, so that a per-call model walk costs about a microsecond."""
    if not isinstance(model, Model):
        raise TypeError(f"{op}: model must be a metacore.network.Model, got "
                        f"{type(model).__name__}")
    key = (model.loss_name, model.num_params) + tuple(
        (type(layer), getattr(layer, "d_in", None), getattr(layer, "d_out", None))
        for layer in model.layers)
    found = _sizes.get(key)
    if found is None:
        found = _read_sizes(op, model)
        if len(_sizes) > 64:
            _sizes.clear()
        _sizes[key] = found
    return found


def _read_sizes(op, model):
    kinds = [type(layer).__name__ for layer in model.layers]
    ok = (len(kinds) % 2 == 1
          and all(type(layer) is (Linear if i % 2 == 0 else ReLU)
                  for i, layer in enumerate(model.layers)))
    if not ok:
        raise ValueError(f"{op}: model {model.name} must be Linear, ReLU, Linear, ..., Linear "
                         f"(alternating, ending in Linear), got layers {kinds}")
    if model.loss_name != "mse":
        raise ValueError(f"{op}: model {model.name} must have loss 'mse', got "
                         f"{model.loss_name!r}")
    linears = list(zip(model.layer_names, model.layers))[::2]
    sizes = tuple([linears[0][1].d_in] + [layer.d_out for _, layer in linears])
    # the kernel reads w then b of each layer end to end: the Model's layout must agree
    dims, woff, boff = _fused.mlp_layout(sizes)
    for (name, _), w0, b0 in zip(linears, woff, boff):
        if (model.layout.slice(f"{name}.w").start != w0
                or model.layout.slice(f"{name}.b").start != b0):
            raise ValueError(f"{op}: model {model.name}'s parameter layout is not the fused "
                             f"kernel's (w then b, layer by layer)")
    return sizes


def mlp_structure(model):
    """-> dims (L+1,), woff (L,), boff (L,) int64: the compiled kernel's arguments for this
    model (metacore.kernels.mlp_maml.mlp_layout of its sizes)."""
    return _fused.mlp_layout(mlp_sizes(model, "mlp_structure"))


def mlp_maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False):
    """metacore.kernels.mlp_maml.mlp_maml_gradient for a Model: model a Linear-ReLU-...-Linear
    Model with loss 'mse'; the rest as there. -> query_loss (T,), grad (P,) (fresh)."""
    return _fused.mlp_maml_gradient(mlp_sizes(model), theta, support_x, support_y, query_x,
                                    query_y, alpha, steps, first_order)


def mlp_reptile_direction(model, theta, support_x, support_y, alpha, steps=1):
    """metacore.kernels.mlp_maml.mlp_reptile_direction for a Model (as mlp_maml_gradient).
    -> loss_0 (T,), d (P,) (fresh)."""
    return _fused.mlp_reptile_direction(mlp_sizes(model, "mlp_reptile_direction"), theta,
                                        support_x, support_y, alpha, steps)
