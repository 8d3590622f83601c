"""Register blocks of SIMD vectors for Numba kernels that must run near the core's peak.

A register-blocked kernel (the direct convolutions of `kernels.conv`) keeps a tile of sums
in registers while it streams over a long reduction: per step it loads a few weight vectors,
broadcasts a few input values and does one fused multiply-add per (value, vector) pair.
LLVM does not turn loops over a small accumulator array into that: it keeps the array in
memory or does not vectorize it (docs/engine.md). So the tile is a `VectorBlock` here, one
LLVM value of `rows x vectors` SIMD vectors of 64 bytes (16 float32 or 8 float64 lanes),
which the register allocator keeps in registers, and the operations that such a kernel needs
are LLVM IR intrinsics:

- `zero_block(like, rows, vectors)`: a block of zeros of `like`'s dtype;
- `fma_broadcast(block, a, a_start, a_step, b, b_start)`: block[r][v] += a[a_start + r*a_step]
  * b[b_start + v*lanes : ...+lanes], for every row r and vector v (a, b: flat arrays);
- `store_block(block, out, start, row_step)`: out[start + r*row_step + v*lanes : ...] =
  block[r][v];

and one that finishes a block before it is stored:

- `add_row_vector(block, values, relu)`: block[r][v] += values[v*lanes : (v+1)*lanes] for every
  row r (a per-channel shift), then max(., 0) if `relu` (NaN gives 0, as `x if x > 0`).

`rows` and `vectors` must be compile-time constants (a kernel factory's closure variables).
Indices are not bounds-checked: the caller's loops guarantee them. 64-byte vectors are
AVX-512 registers; on a CPU without AVX-512, LLVM splits each into two or four narrower ones.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 64


def lanes(dtype):
    """Values of `dtype` in one vector: 16 float32, 8 float64."""
    return VECTOR_BYTES // dtype.itemsize


class VectorBlock(types.Type):
    """rows x vectors SIMD vectors of `dtype` (float32 or float64), held as one LLVM value."""

    def __init__(self, dtype, rows, vectors):
        self.dtype, self.rows, self.vectors = dtype, rows, vectors
        super().__init__(name=f"VectorBlock({dtype}, {rows}, {vectors})")


def _vector_type(dtype):
    element = ir.FloatType() if dtype == types.float32 else ir.DoubleType()
    return ir.VectorType(element, VECTOR_BYTES // (dtype.bitwidth // 8))


@register_model(VectorBlock)
class _VectorBlockModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        vector = _vector_type(fe_type.dtype)
        super().__init__(dmm, fe_type, ir.ArrayType(vector, fe_type.rows * fe_type.vectors))


def _is_flat_float_array(array):
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and array.dtype in (types.float32, types.float64))


def _address(context, builder, array_type, array, index):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


def _indices(context, builder, signature, args, positions):
    """The integer arguments at `positions` as intp values (literals arrive as int64)."""
    return [context.cast(builder, args[i], signature.args[i], types.intp) for i in positions]


@intrinsic
def zero_block(typingctx, like, rows, vectors):
    if not (_is_flat_float_array(like) and isinstance(rows, types.IntegerLiteral)
            and isinstance(vectors, types.IntegerLiteral)):
        return None
    block = VectorBlock(like.dtype, rows.literal_value, vectors.literal_value)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(block), None)

    return block(like, rows, vectors), codegen


@intrinsic
def fma_broadcast(typingctx, block, a, a_start, a_step, b, b_start):
    if not (isinstance(block, VectorBlock) and _is_flat_float_array(a)
            and _is_flat_float_array(b) and a.dtype == b.dtype == block.dtype
            and all(isinstance(i, types.Integer) for i in (a_start, a_step, b_start))):
        return None

    def codegen(context, builder, signature, args):
        tiles, a_array, _, _, b_array, _ = args
        a_first, a_stride, b_first = _indices(context, builder, signature, args, (2, 3, 5))
        vector = _vector_type(block.dtype)
        width = vector.count
        index_type = a_first.type
        fma_name = f"llvm.fma.v{width}f{block.dtype.bitwidth}"
        fma = builder.module.globals.get(fma_name) or ir.Function(
            builder.module, ir.FunctionType(vector, [vector] * 3), fma_name)
        weights = []
        for v in range(block.vectors):
            offset = builder.add(b_first, ir.Constant(index_type, v * width))
            address = _address(context, builder, signature.args[4], b_array, offset)
            weights.append(builder.load(builder.bitcast(address, vector.as_pointer()), align=1))
        undefined = ir.Constant(vector, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
        for r in range(block.rows):
            offset = builder.add(a_first, builder.mul(a_stride, ir.Constant(index_type, r)))
            value = builder.load(_address(context, builder, signature.args[1], a_array, offset))
            broadcast = builder.shuffle_vector(
                builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0)),
                undefined, splat_mask)
            for v in range(block.vectors):
                slot = r * block.vectors + v
                total = builder.call(fma, [broadcast, weights[v],
                                           builder.extract_value(tiles, slot)])
                tiles = builder.insert_value(tiles, total, slot)
        return tiles

    return block(block, a, a_start, a_step, b, b_start), codegen


@intrinsic
def add_row_vector(typingctx, block, values, relu):
    if not (isinstance(block, VectorBlock) and _is_flat_float_array(values)
            and values.dtype == block.dtype and isinstance(relu, types.Boolean)):
        return None

    def codegen(context, builder, signature, args):
        tiles, values_array, clamp = args
        vector = _vector_type(block.dtype)
        index_type = context.get_value_type(types.intp)
        zero = ir.Constant(vector, None)
        clamp = builder.trunc(clamp, ir.IntType(1)) if clamp.type != ir.IntType(1) else clamp
        for v in range(block.vectors):
            address = _address(context, builder, signature.args[1], values_array,
                               ir.Constant(index_type, v * vector.count))
            shift = builder.load(builder.bitcast(address, vector.as_pointer()), align=1)
            for r in range(block.rows):
                slot = r * block.vectors + v
                total = builder.fadd(builder.extract_value(tiles, slot), shift)
                clipped = builder.select(builder.fcmp_ordered(">", total, zero), total, zero)
                tiles = builder.insert_value(tiles, builder.select(clamp, clipped, total), slot)
        return tiles

    return block(block, values, relu), codegen


@intrinsic
def store_block(typingctx, block, out, start, row_step):
    if not (isinstance(block, VectorBlock) and _is_flat_float_array(out)
            and out.dtype == block.dtype
            and all(isinstance(i, types.Integer) for i in (start, row_step))):
        return None

    def codegen(context, builder, signature, args):
        tiles, out_array = args[:2]
        first, stride = _indices(context, builder, signature, args, (2, 3))
        vector = _vector_type(block.dtype)
        index_type = first.type
        for r in range(block.rows):
            row_first = builder.add(first, builder.mul(stride, ir.Constant(index_type, r)))
            for v in range(block.vectors):
                offset = builder.add(row_first, ir.Constant(index_type, v * vector.count))
                address = _address(context, builder, signature.args[1], out_array, offset)
                builder.store(builder.extract_value(tiles, r * block.vectors + v),
                              builder.bitcast(address, vector.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(block, out, start, row_step), codegen
