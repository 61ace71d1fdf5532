# plan:    4x4/8x4 tiles = 16/32 tokens (closed-form, one plan for all heads): 0 full + 50 partial of 96
# tokens:  N-D tiles 4x4/8x4 on grid 10x14, tile-major order padded to 12x16 / 16x16:
#          q, k are positions 0..191 / 0..255; position p is in tile p // BLOCK, row-major offset p % BLOCK inside it
#          (BLOCK_M = 16, BLOCK_N = 32); padded positions are never allowed; the runtime gathers q, k, v
#          into this order and scatters out, lse, dq, dk, dv back

@triton.jit
def _mask(q, k, h, b, M, N, G0, G1):
    """natten2d: True where query row q may attend key k (head h, batch b).

    q, k are clamped into [0, M) and [0, N) by the caller; they broadcast
    ([BLOCK_M, 1] and [1, BLOCK_N] in the forward kernel, transposed in dK/dV)."""
    t0 = q // 16
    t1 = q % 16
    t2 = t0 // 4 * 4 + t1 // 4
    t3 = t0 % 4 * 4 + t1 % 4
    t4 = k // 32
    t5 = k % 32
    t6 = t4 // 4 * 8 + t5 // 4
    t7 = t4 % 4 * 4 + t5 % 4
    t8 = tl.minimum(t6, 9)
    t9 = tl.maximum(tl.minimum(tl.minimum(t2, 9) - 1, 7), 0)
    t10 = tl.minimum(t7, 13)
    t11 = tl.maximum(tl.minimum(tl.minimum(t3, 13) - 1, 11), 0)
    return (t2 < 10) & (t3 < 14) & (t6 < 10) & (t7 < 14) & (t8 >= t9) & (t8 < t9 + 3) & (t10 >= t11) & (t10 < t11 + 3)
