"""256-bit vector values for Numba kernels: load, store, broadcast, fused multiply-add.

Why: Numba vectorises only innermost loops, re-checks at every loop entry that the arrays
do not overlap, and runs a scalar tail when the trip count is not a multiple of its chosen
width. For the 40-wide rows of the sinusoid MLP that overhead costs as much as the
arithmetic, and no loop form keeps a block of outputs in registers across the reduction.
With an explicit vector value, a register tile is a handful of local variables: the
compiler keeps them in vector registers for a whole reduction loop, with no alias checks
and no tails (widths must be multiples of the lane count; callers fall back otherwise).

Values:
    Vec  a vector of LANES[dtype] floats (8 float32 or 4 float64 = 256 bits), a Numba type
         lowered to LLVM <L x float> / <L x double>; on machines without 256-bit registers
         LLVM splits it into narrower ones (same results, just slower).
Intrinsics (use inside @njit code only; indices are not bounds-checked):
    vload(row, i)       row[i : i + L] of a C-contiguous 1-D float32/float64 array -> Vec
    vstore(row, i, v)   row[i : i + L] <- v
    vsplat(x)           Vec with every lane = the float32/float64 scalar x
    vzero(row)          Vec of zeros in row's dtype
    vfma(a, b, c)       a * b + c lane by lane, one rounding (llvm.fma)
    vadd(a, b)          a + b lane by lane
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 32
LANES = {np.dtype(np.float32): VECTOR_BYTES // 4, np.dtype(np.float64): VECTOR_BYTES // 8}


class Vec(types.Type):
    """LANES[dtype] floats of one dtype held as one vector value."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vec({dtype} x {self.lanes})")


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _float_row(op, row):
    """The typing check: a C-contiguous 1-D float32/float64 array."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype in (types.float32, types.float64)):
        raise TypeError(f"{op}: needs a C-contiguous 1-D float32 or float64 array, got {row}")
    return row.dtype


def _element_pointer(context, builder, aryty, ary_value, index_type, index_value):
    ary = context.make_array(aryty)(context, builder, ary_value)
    i = context.cast(builder, index_value, index_type, types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [i])


def _vector_pointer(builder, pointer, vecty):
    return builder.bitcast(pointer, vecty.as_pointer())


@intrinsic
def vload(typingctx, row, i):
    dtype = _float_row("vload", row)
    if not isinstance(i, types.Integer):
        raise TypeError(f"vload: index must be an integer, got {i}")
    sig = Vec(dtype)(row, i)

    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.return_type)
        p = _element_pointer(context, builder, signature.args[0], args[0],
                             signature.args[1], args[1])
        return builder.load(_vector_pointer(builder, p, vecty), typ=vecty,
                            align=dtype.bitwidth // 8)
    return sig, codegen


@intrinsic
def vstore(typingctx, row, i, v):
    dtype = _float_row("vstore", row)
    if not isinstance(i, types.Integer):
        raise TypeError(f"vstore: index must be an integer, got {i}")
    if not (isinstance(v, Vec) and v.dtype == dtype):
        raise TypeError(f"vstore: value must be a Vec of {dtype}, got {v}")
    sig = types.none(row, i, v)

    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.args[2])
        p = _element_pointer(context, builder, signature.args[0], args[0],
                             signature.args[1], args[1])
        builder.store(args[2], _vector_pointer(builder, p, vecty), align=dtype.bitwidth // 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def vsplat(typingctx, x):
    if x not in (types.float32, types.float64):
        raise TypeError(f"vsplat: needs a float32 or float64 scalar, got {x}")
    sig = Vec(x)(x)

    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.return_type)
        lanes = signature.return_type.lanes
        one = builder.insert_element(ir.Constant(vecty, ir.Undefined), args[0],
                                     ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        return builder.shuffle_vector(one, ir.Constant(vecty, ir.Undefined), mask)
    return sig, codegen


@intrinsic
def vzero(typingctx, row):
    dtype = _float_row("vzero", row)
    sig = Vec(dtype)(row)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(signature.return_type), None)
    return sig, codegen


def _same_vectors(op, *vs):
    if not (all(isinstance(v, Vec) for v in vs) and len({v.dtype for v in vs}) == 1):
        raise TypeError(f"{op}: needs Vec values of one dtype, got {vs}")


@intrinsic
def vfma(typingctx, a, b, c):
    _same_vectors("vfma", a, b, c)
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.return_type)
        element = "f32" if signature.return_type.dtype == types.float32 else "f64"
        name = f"llvm.fma.v{signature.return_type.lanes}{element}"
        fma = cgutils.get_or_insert_function(builder.module,
                                             ir.FunctionType(vecty, [vecty] * 3), name)
        return builder.call(fma, args)
    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    _same_vectors("vadd", a, b)
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])
    return sig, codegen
