"""256-bit vector values and borrowed views for Numba kernels: load, store, broadcast,
fused multiply-add, lane sum, tile transpose; array views without reference counting.

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
    vload2(a, i, j), vstore2(a, i, j, v)   the same at a[i, j : j + L] of a C-contiguous
                        2-D array, without a row view (whose reference counting costs more
                        than the load)
    vsplat(x)           Vec with every lane = the float32/float64 scalar x
    vzero(row)          Vec of zeros in row's dtype
    vfma(a, b, c)       a * b + c lane by lane, one rounding (llvm.fma)
    vadd(a, b)          a + b lane by lane
    view2d(buf, o, r, c) buf[o : o + r c] as a (r, c) C-contiguous view, cheaply; borrowed
                        (no reference held: use inside the kernel only, never return it)
    as_flat(a)          a C-contiguous 2-D array as its 1-D view, cheaply; borrowed
    view1d(buf, o, n)   buf[o : o + n], borrowed;  brow(a, i)  a[i] of a 2-D / 3-D array,
                        borrowed
    vtranspose(src, so, sl, dst, do, dl)  an L x L block of src (row stride sl) into dst
                        transposed (row stride dl), in vector registers
    vsum(a)             the sum of a's lanes in a fixed order: the upper half added onto the
                        lower half, log2(L) times (for 8 lanes ((0+4)+(2+6))+((1+5)+(3+7)))
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model
from numba.np.arrayobj import populate_array

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


def _float_array(op, a, ndims=(1,)):
    """The typing check: a C-contiguous float32/float64 array of one of the ranks `ndims`.
    -> its dtype."""
    if not (isinstance(a, types.Array) and a.ndim in ndims and a.layout == "C"
            and a.dtype in (types.float32, types.float64)):
        rank = " or ".join(f"{n}-D" for n in ndims)
        raise TypeError(f"{op}: needs a C-contiguous {rank} float32 or float64 array, got {a}")
    return a.dtype


def _float_row(op, row):
    return _float_array(op, row, (1,))


def _integers(op, **named):
    """The typing check of index and size arguments."""
    for name, v in named.items():
        if not isinstance(v, types.Integer):
            raise TypeError(f"{op}: {name} must be an integer, got {v}")


def _item_pointer(context, builder, aryty, ary_value, index_types, index_values):
    """Pointer to ary[indices] (no bounds check)."""
    ary = context.make_array(aryty)(context, builder, ary_value)
    idx = [context.cast(builder, v, t, types.intp) for v, t in zip(index_values, index_types)]
    return cgutils.get_item_pointer(context, builder, aryty, ary, idx)


def _borrowed_view(context, builder, out, data, shape, strides, parent):
    """An array value of type `out` over `data` with no meminfo: no reference is taken,
    so nothing is counted (the views of view2d, as_flat, view1d and brow)."""
    view = context.make_array(out)(context, builder)
    item = context.get_constant(types.intp, out.dtype.bitwidth // 8)
    null = context.get_constant_null(types.MemInfoPointer(types.voidptr))
    populate_array(view, data=data, shape=shape, strides=strides, itemsize=item,
                   meminfo=null, parent=parent)
    return view._getvalue()


def _vector_pointer(builder, pointer, vecty):
    return builder.bitcast(pointer, vecty.as_pointer())


def _load_codegen(n_index):
    """Codegen of a Vec load from a[i_0, .., i_{n-1} : + L]: signature (a, i_0, ..)."""
    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.return_type)
        p = _item_pointer(context, builder, signature.args[0], args[0],
                          signature.args[1:1 + n_index], args[1:1 + n_index])
        return builder.load(_vector_pointer(builder, p, vecty), typ=vecty,
                            align=signature.return_type.dtype.bitwidth // 8)
    return codegen


def _store_codegen(n_index):
    """Codegen of a[i_0, .., i_{n-1} : + L] <- v: signature (a, i_0, .., v)."""
    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(signature.args[-1])
        p = _item_pointer(context, builder, signature.args[0], args[0],
                          signature.args[1:1 + n_index], args[1:1 + n_index])
        builder.store(args[-1], _vector_pointer(builder, p, vecty),
                      align=signature.args[-1].dtype.bitwidth // 8)
        return context.get_dummy_value()
    return codegen


@intrinsic
def vload(typingctx, row, i):
    dtype = _float_row("vload", row)
    _integers("vload", index=i)
    return Vec(dtype)(row, i), _load_codegen(1)


@intrinsic
def vstore(typingctx, row, i, v):
    dtype = _float_row("vstore", row)
    _integers("vstore", index=i)
    if not (isinstance(v, Vec) and v.dtype == dtype):
        raise TypeError(f"vstore: value must be a Vec of {dtype}, got {v}")
    return types.none(row, i, v), _store_codegen(1)


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


@intrinsic
def vsum(typingctx, a):
    _same_vectors("vsum", a)
    sig = a.dtype(a)

    def codegen(context, builder, signature, args):
        lanes = signature.args[0].lanes
        v, width = args[0], lanes
        while width > 1:                 # fold the upper half onto the lower half
            width //= 2
            mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                               [(j + width) % lanes for j in range(lanes)])
            v = builder.fadd(v, builder.shuffle_vector(v, v, mask))
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    return sig, codegen


@intrinsic
def view2d(typingctx, buf, off, rows, cols):
    """buf[off : off + rows * cols] as a C-contiguous (rows, cols) array sharing buf's memory:
    what buf[off:off + rows * cols].reshape(rows, cols) gives, without reshape's general
    stride search and without reference counting (together about 50 ns a call, which for
    10 x 40 blocks costs more than the work). The view is borrowed: it holds no reference
    to buf's memory, so it is valid only while buf is, and must never be returned to
    Python (copy it). Unchecked: the caller guarantees off + rows * cols <= buf.size."""
    dtype = _float_row("view2d", buf)
    _integers("view2d", off=off, rows=rows, cols=cols)
    out = types.Array(dtype, 2, "C")
    sig = out(buf, off, rows, cols)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        o, r, c = (context.cast(builder, v, t, types.intp)
                   for v, t in zip(args[1:], signature.args[1:]))
        item = context.get_constant(types.intp, dtype.bitwidth // 8)
        return _borrowed_view(context, builder, out, builder.gep(src.data, [o]), [r, c],
                              [builder.mul(c, item), item], src.parent)
    return sig, codegen


@intrinsic
def as_flat(typingctx, a):
    """A C-contiguous 2-D float array as the 1-D C-contiguous view of all its elements (what
    a.reshape(a.size) gives, without reshape's general stride search). Borrowed, like
    view2d's views: valid while a's memory is, never to be returned to Python."""
    out = types.Array(_float_array("as_flat", a, (2,)), 1, "C")
    sig = out(a)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, src.shape, 2)
        item = context.get_constant(types.intp, a.dtype.bitwidth // 8)
        return _borrowed_view(context, builder, out, src.data,
                              [builder.mul(shape[0], shape[1])], [item], src.parent)
    return sig, codegen


@intrinsic
def vtranspose(typingctx, src, s_off, s_ld, dst, d_off, d_ld):
    """An L x L block transposed: dst[d_off + j d_ld + i] <- src[s_off + i s_ld + j] for
    i, j < L (L = the lanes of the dtype). L vector loads, log2(L) rounds of L lane
    shuffles (round b swaps the off-diagonal b x b sub-blocks of each 2b x 2b block), L
    vector stores. src and dst: C-contiguous 1-D arrays of one float dtype, not
    overlapping. Unchecked."""
    dtype = _float_row("vtranspose", src)
    if _float_row("vtranspose", dst) != dtype:
        raise TypeError(f"vtranspose: src and dst dtypes differ ({src}, {dst})")
    _integers("vtranspose", s_off=s_off, s_ld=s_ld, d_off=d_off, d_ld=d_ld)
    sig = types.none(src, s_off, s_ld, dst, d_off, d_ld)
    lanes = VECTOR_BYTES // (dtype.bitwidth // 8)

    def codegen(context, builder, signature, args):
        vecty = context.get_value_type(Vec(dtype))
        srcty, _, _, dstty, _, _ = signature.args
        s_arr = context.make_array(srcty)(context, builder, args[0])
        d_arr = context.make_array(dstty)(context, builder, args[3])
        so, sl, do, dl = (context.cast(builder, args[i], signature.args[i], types.intp)
                          for i in (1, 2, 4, 5))
        rows = []
        for i in range(lanes):
            at = builder.add(so, builder.mul(sl, context.get_constant(types.intp, i)))
            p = builder.gep(s_arr.data, [at])
            rows.append(builder.load(_vector_pointer(builder, p, vecty), typ=vecty,
                                     align=dtype.bitwidth // 8))
        b = 1
        i32 = ir.IntType(32)
        while b < lanes:
            lo = ir.Constant(ir.VectorType(i32, lanes),
                             [j if not j & b else lanes + j - b for j in range(lanes)])
            hi = ir.Constant(ir.VectorType(i32, lanes),
                             [j + b if not j & b else lanes + j for j in range(lanes)])
            new = list(rows)
            for i in range(lanes):
                if not i & b:
                    new[i] = builder.shuffle_vector(rows[i], rows[i + b], lo)
                    new[i + b] = builder.shuffle_vector(rows[i], rows[i + b], hi)
            rows = new
            b *= 2
        for j in range(lanes):
            at = builder.add(do, builder.mul(dl, context.get_constant(types.intp, j)))
            p = builder.gep(d_arr.data, [at])
            builder.store(rows[j], _vector_pointer(builder, p, vecty),
                          align=dtype.bitwidth // 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def vload2(typingctx, a, i, j):
    """a[i, j : j + L] of a C-contiguous 2-D array -> Vec, without making a row view (a
    view is a new reference: two reference-count updates per row)."""
    dtype = _float_array("vload2", a, (2,))
    return Vec(dtype)(a, i, j), _load_codegen(2)


@intrinsic
def vstore2(typingctx, a, i, j, v):
    """a[i, j : j + L] <- v for a C-contiguous 2-D array (no row view)."""
    dtype = _float_array("vstore2", a, (2,))
    if not (isinstance(v, Vec) and v.dtype == dtype):
        raise TypeError(f"vstore2: value must be a Vec of {dtype}, got {v}")
    return types.none(a, i, j, v), _store_codegen(2)


@intrinsic
def view1d(typingctx, buf, off, n):
    """buf[off : off + n] of a C-contiguous 1-D float array as a borrowed view (no reference
    counting; see view2d). Unchecked."""
    dtype = _float_row("view1d", buf)
    _integers("view1d", off=off, n=n)
    out = types.Array(dtype, 1, "C")
    sig = out(buf, off, n)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        o, k = (context.cast(builder, v, t, types.intp)
                for v, t in zip(args[1:], signature.args[1:]))
        item = context.get_constant(types.intp, dtype.bitwidth // 8)
        return _borrowed_view(context, builder, out, builder.gep(src.data, [o]), [k], [item],
                              src.parent)
    return sig, codegen


@intrinsic
def brow(typingctx, a, i):
    """a[i] of a C-contiguous 2-D or 3-D float array as a borrowed (ndim - 1)-D view (no
    reference counting; see view2d). Unchecked."""
    dtype = _float_array("brow", a, (2, 3))
    _integers("brow", index=i)
    out = types.Array(dtype, a.ndim - 1, "C")
    sig = out(a, i)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, src.shape, a.ndim)
        strides = cgutils.unpack_tuple(builder, src.strides, a.ndim)
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        per_row = shape[1] if a.ndim == 2 else builder.mul(shape[1], shape[2])
        return _borrowed_view(context, builder, out,
                              builder.gep(src.data, [builder.mul(idx, per_row)]),
                              list(shape[1:]), list(strides[1:]), src.parent)
    return sig, codegen
