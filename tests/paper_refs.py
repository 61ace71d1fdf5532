"""Independent reference masks for well-known sparse-attention methods.

Every function here is written from the original paper's (or the reference library's)
definition, with plain Python loops, so that it can serve as an oracle for the compiler's
own ``mask()``.  Nothing here is shared with, or derived from, attnc's implementation.
Clarity beats speed: the sizes used in tests are small (a few hundred tokens at most).

Conventions (see /work/shared/attn-language.md, section 1):

* Every function returns a numpy ``bool`` array of shape ``[M, N]`` (``[H, M, N]`` when
  heads matter); ``True`` means "query may attend to key".
* Queries are bottom-right aligned: query row ``q`` (0..M-1) has absolute position
  ``qa = q + (N - M)``.
* Grid layouts have ``M == N == prod(shape)`` and positions are the row-major flattening
  of the grid (last axis fastest), i.e. ``numpy.ravel_multi_index(coord, shape)``.

Sources:

* Mistral 7B (arXiv 2310.06825) / HF ``sliding_window`` convention.
* StreamingLLM (arXiv 2309.17453), DuoAttention (arXiv 2410.10819).
* Longformer (arXiv 2004.05150), prefix-LM (T5 / UniLM), packed sequences (varlen).
* BigBird (arXiv 2007.14062), ITC variant; the random-block generator is the project's.
* NATTEN (github.com/SHI-Labs/NATTEN): ``csrc/include/natten/cuda/reference/mask.hpp``
  (``get_win_start`` / ``get_win_end`` / ``qkv_fix_dilation``) and
  ``src/natten/backends/flex.py`` (``get_na_flex_mask``); Generalized Neighborhood
  Attention (arXiv 2504.16922) for ``stride``.
* Swin Transformer (arXiv 2103.14030), official ``SwinTransformerBlock`` mask code.
* HaloNet (arXiv 2103.12731), MaxViT (arXiv 2204.01697), CSWin (arXiv 2107.00652),
  MM-DiT (SD3, arXiv 2403.03206) with a local image window.
* Sparse Transformer (arXiv 1904.10509), section 4.2 (strided and fixed A1 / A2 sets).
* MoA (arXiv 2406.14909): per-head spans S_h = alpha_h + beta_h * N with initial tokens.
* Axial attention (arXiv 1912.12180), CrossFormer (arXiv 2108.00154, official
  ``CrossFormerBlock`` grouping), HiLo / LITv2 (arXiv 2205.13213, official ``HiLo`` module),
  BiFormer (arXiv 2303.08125, bi-level routing: region means, top-k regions, token gather).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "sliding_window",
    "streaming_llm",
    "duo",
    "longformer",
    "prefix_lm",
    "packed",
    "mix32",
    "rand_u32",
    "random_keys",
    "bigbird",
    "natten_axis",
    "natten",
    "swin",
    "halo",
    "maxvit_grid",
    "cswin",
    "mmdit_local",
    "sparse_strided",
    "sparse_fixed",
    "moa",
    "maxvit_block",
    "axial",
    "crossformer_sda",
    "crossformer_lda",
    "hilo",
    "video_window",
    "biformer",
]


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _empty(M, N):
    return np.zeros((M, N), dtype=bool)


def _absolute(q, M, N):
    """Bottom-right alignment: absolute position of query row q."""
    return q + (N - M)


def _per_axis(value, ndim, name):
    """Broadcast a scalar to every axis, or check a per-axis tuple has the right length."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name}: expected {ndim} values (one per axis), got {value!r}")
        return tuple(value)
    return (value,) * ndim


def _check_shape(shape):
    if not isinstance(shape, (tuple, list)) or len(shape) == 0:
        raise ValueError(f"shape must be a non-empty tuple, got {shape!r}")
    for s in shape:
        if int(s) != s or s < 1:
            raise ValueError(f"shape entries must be positive integers, got {shape!r}")
    return tuple(int(s) for s in shape)


def _coords(shape):
    """All grid coordinates in row-major order (last axis fastest): position p <-> coords[p]."""
    return list(itertools.product(*[range(s) for s in shape]))


def _flat(coord, shape):
    """Row-major flat index of a grid coordinate (written out, no numpy helper)."""
    p = 0
    for c, s in zip(coord, shape):
        p = p * s + c
    return p


# --------------------------------------------------------------------------------------
# 1-D (sequence) patterns
# --------------------------------------------------------------------------------------


def sliding_window(M, N, w):
    """Mistral sliding-window attention: each query sees itself and the w-1 keys before it.

    Key j is allowed iff qa - w < j <= qa.
    """
    m = _empty(M, N)
    for q in range(M):
        qa = _absolute(q, M, N)
        for j in range(N):
            if qa - w < j <= qa:
                m[q, j] = True
    return m


def streaming_llm(M, N, sinks, recent):
    """StreamingLLM: a rolling KV cache of the `recent` most recent tokens plus the first
    `sinks` tokens ("attention sinks"), which are kept forever (but never look ahead)."""
    m = _empty(M, N)
    for q in range(M):
        qa = _absolute(q, M, N)
        for j in range(N):
            in_recent_window = qa - recent < j <= qa
            is_sink = j < sinks and j <= qa
            if in_recent_window or is_sink:
                m[q, j] = True
    return m


def duo(H, M, N, retrieval, recent=256, sinks=64):
    """DuoAttention: "retrieval heads" keep the full causal KV cache; every other head is a
    "streaming head" (StreamingLLM: recent window + attention sinks).  Returns [H, M, N]."""
    retrieval = set(retrieval)
    out = np.zeros((H, M, N), dtype=bool)
    for h in range(H):
        for q in range(M):
            qa = _absolute(q, M, N)
            for j in range(N):
                if h in retrieval:
                    ok = j <= qa
                else:
                    ok = (qa - recent < j <= qa) or (j < sinks and j <= qa)
                out[h, q, j] = ok
    return out


def longformer(M, N, window, globals_):
    """Longformer: sliding window of `window` tokens on each side (|qa - j| <= window) plus
    symmetric global attention for tokens 0..globals_-1 (a global token attends to every
    token and every token attends to it)."""
    m = _empty(M, N)
    for q in range(M):
        qa = _absolute(q, M, N)
        for j in range(N):
            local = abs(qa - j) <= window
            global_ = qa < globals_ or j < globals_
            m[q, j] = local or global_
    return m


def prefix_lm(M, N, n):
    """Prefix LM: bidirectional attention inside the prefix [0, n), causal elsewhere."""
    m = _empty(M, N)
    for q in range(M):
        qa = _absolute(q, M, N)
        for j in range(N):
            m[q, j] = (j <= qa) or (qa < n and j < n)
    return m


def packed(doc):
    """Packed documents (varlen): causal attention that never crosses a document boundary.
    `doc` is a length-N sequence of document ids; M == N."""
    doc = [int(x) for x in doc]
    N = len(doc)
    m = _empty(N, N)
    for i in range(N):
        for j in range(N):
            m[i, j] = j <= i and doc[i] == doc[j]
    return m


# --------------------------------------------------------------------------------------
# BigBird
# --------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def mix32(x):
    """Chris Wellons' lowbias32 integer hash (32-bit)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def rand_u32(seed, row, j):
    return mix32(mix32(mix32(seed) + row) + j)


def random_keys(seed, row, n, r):
    """Floyd's sampling: r distinct values of range(n) for this row (the project's
    documented, backend-independent generator)."""
    if r >= n:
        return set(range(n))
    chosen = set()
    for j in range(n - r, n):
        t = rand_u32(seed, row, j) % (j + 1)
        chosen.add(j if t in chosen else t)
    return chosen


def bigbird(M, N, b, r, seed=0):
    """BigBird (ITC) at block granularity b.

    Key blocks: nb = ceil(N / b).  A query block (qa // b) attends to
      * the 3 key blocks around it (sliding window of blocks: -1, 0, +1),
      * the global blocks {0, nb - 1} -- global in both directions, so the global *query*
        blocks also attend to every key block,
      * r random key blocks, random_keys(seed, query_block, nb, r).
    Token (qa, j) is allowed iff block (qa // b, j // b) is allowed.
    """
    nb = -(-N // b)  # ceil(N / b)
    global_blocks = {0, nb - 1}

    def block_allowed(qb, kb):
        if abs(qb - kb) <= 1:
            return True
        if qb in global_blocks or kb in global_blocks:
            return True
        return kb in random_keys(seed, qb, nb, r)

    m = _empty(M, N)
    for q in range(M):
        qa = _absolute(q, M, N)
        qb = qa // b
        for j in range(N):
            m[q, j] = block_allowed(qb, j // b)
    return m


# --------------------------------------------------------------------------------------
# NATTEN: neighborhood attention (dilation, GNA stride, causal, even kernel sizes)
# --------------------------------------------------------------------------------------


def _check_natten_axis(L, size, dilation, stride, causal):
    for name, v in (("size", size), ("dilation", dilation), ("stride", stride)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"natten: {name} must be an integer, got {v!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"natten: causal must be a bool, got {causal!r}")
    if size < 2:
        raise ValueError(f"natten: kernel size must be >= 2, got {size}")
    if dilation < 1:
        raise ValueError(f"natten: dilation must be >= 1, got {dilation}")
    if stride < 1:
        raise ValueError(f"natten: stride must be >= 1, got {stride}")
    if size * dilation > L:
        raise ValueError(
            f"natten: kernel size * dilation ({size} * {dilation}) cannot exceed the axis length {L}"
        )
    if stride > size:
        raise ValueError(f"natten: stride ({stride}) cannot be larger than kernel size ({size})")


def natten_axis(L, x, size, dilation=1, stride=1, causal=False):
    """Keys (as coordinates along this axis, 0..L-1) that the query at coordinate x attends
    to, per NATTEN's reference mask (csrc/include/natten/cuda/reference/mask.hpp).

    How NATTEN does it, in words:

    1. Dilation splits the axis into `dilation` interleaved groups by residue: the query at x
       belongs to group g = x % dilation, and is the i-th member of that group, i = x // dilation.
       Attention never crosses groups.  Inside its group the query runs plain (undilated)
       neighborhood attention over a sequence of length Lg = number of positions of the axis
       with that residue (NATTEN's ``qkv_fix_dilation``: L // d, plus one if the group gets one
       of the L % d leftover positions).
    2. Stride (Generalized Neighborhood Attention): consecutive group-local queries are
       bundled into stride groups of `stride` queries [ (i//s)*s, (i//s)*s + s ); the whole
       bundle shares the window of one "leader" query:
         * non-causal: the centre query of the bundle, (i//s)*s + s//2 (the right one of the
           two middle queries when s is even),
         * causal: the last query of the bundle, (i//s)*s + s - 1,
       in both cases clipped to the last valid query Lg - 1.
    3. Window of the leader (group-local coordinates):
         * non-causal: `size` keys, wl = size//2 to the left and wr = size//2 + size%2 - 1 to the
           right (an even kernel leans left); near an edge the window is *shifted* inwards
           (never shrunk): start = max(leader - wl, 0), and if leader + wr runs past the end,
           start is moved back by the overshoot.  end = start + size.
         * causal: start = max(leader - (size - 1), 0); the window ends at the query itself
           (end = i + 1), so a query never sees a later key even when its leader would.
    4. Map the group-local key range back to axis coordinates: key = k * dilation + g.
    """
    _check_natten_axis(L, size, dilation, stride, causal)
    if not 0 <= x < L:
        raise ValueError(f"natten_axis: query coordinate {x} outside [0, {L})")
    d, s = dilation, stride

    # 1. dilation group
    g = x % d
    i = x // d
    Lg = 0
    for pos in range(L):
        if pos % d == g:
            Lg += 1

    # 2./3. window on the group-local sequence
    wl = size // 2
    wr = size // 2 + (size % 2 - 1)
    if causal:
        leader = min((i // s) * s + s - 1, Lg - 1)
        start = max(leader - wl - wr, 0)  # wl + wr == size - 1
        end = min(i + 1, Lg)
    else:
        leader = min((i // s) * s + s // 2, Lg - 1)
        start = max(leader - wl, 0)
        if leader + wr >= Lg:  # window would run past the end: shift it back
            start += Lg - wr - leader - 1
        end = start + size

    # 4. back to axis coordinates
    return [k * d + g for k in range(start, end)]


def natten(shape, size, dilation=1, stride=1, causal=False):
    """NATTEN neighborhood attention on a 1-D, 2-D or 3-D grid (M == N == prod(shape)).

    `size`, `dilation`, `stride`, `causal` are each a scalar (all axes) or a per-axis tuple.
    Per axis the allowed keys are `natten_axis(...)`; a key is allowed iff it is allowed on
    every axis (the per-axis neighborhoods are AND-ed over the flattened grid).
    """
    shape = _check_shape(shape)
    nd = len(shape)
    if nd > 3:
        raise ValueError(f"natten: only 1-D, 2-D and 3-D grids are supported, got {shape!r}")
    size = _per_axis(size, nd, "size")
    dilation = _per_axis(dilation, nd, "dilation")
    stride = _per_axis(stride, nd, "stride")
    causal = _per_axis(causal, nd, "causal")
    for a in range(nd):
        _check_natten_axis(shape[a], size[a], dilation[a], stride[a], causal[a])

    # per-axis neighborhoods, one list of key coordinates per query coordinate
    nbhd = [
        [natten_axis(shape[a], x, size[a], dilation[a], stride[a], causal[a]) for x in range(shape[a])]
        for a in range(nd)
    ]
    N = math.prod(shape)
    m = _empty(N, N)
    for qc in _coords(shape):
        qp = _flat(qc, shape)
        per_axis_keys = [nbhd[a][qc[a]] for a in range(nd)]
        for kc in itertools.product(*per_axis_keys):
            m[qp, _flat(kc, shape)] = True
    return m


# --------------------------------------------------------------------------------------
# Swin (shifted) window attention, the way the official code does it
# --------------------------------------------------------------------------------------


def _window_partition(arr, win):
    """Swin's window_partition on an N-D array of per-position values:
    [L0, L1, ...] -> [num_windows, prod(win)] (windows row-major, tokens row-major inside)."""
    nd = arr.ndim
    split = []
    for L, w in zip(arr.shape, win):
        split += [L // w, w]
    a = arr.reshape(split)
    # (n0, w0, n1, w1, ...) -> (n0, n1, ..., w0, w1, ...)
    order = [2 * k for k in range(nd)] + [2 * k + 1 for k in range(nd)]
    return a.transpose(order).reshape(-1, math.prod(win))


def swin(shape, win, shift):
    """Swin Transformer window attention; shift > 0 gives the shifted-window (SW-MSA) block.

    Following the official SwinTransformerBlock:
      1. cyclically roll the token grid by -shift on every axis (torch.roll(x, -shift)),
      2. label the rolled grid with regions: per axis the slices (0, -win), (-win, -shift),
         (-shift, None) (the `img_mask` / `cnt` loop),
      3. partition the rolled grid into win x win windows; inside a window, a pair of tokens
         is masked (-100) when their region labels differ,
      4. map rolled positions back to the original token positions (roll by +shift).
    shift == 0 is plain (W-MSA) window attention with no region mask.
    `win` and `shift` may be scalars or per-axis tuples.  Each axis must be divisible by win.
    """
    shape = _check_shape(shape)
    nd = len(shape)
    win = _per_axis(win, nd, "win")
    shift = _per_axis(shift, nd, "shift")
    for L, w, s in zip(shape, win, shift):
        if w < 1:
            raise ValueError(f"swin: window size must be >= 1, got {win!r}")
        if L % w != 0:
            raise ValueError(f"swin: grid {shape!r} is not divisible by window {win!r}")
        if not 0 <= s < w:
            raise ValueError(f"swin: shift must satisfy 0 <= shift < win, got shift={shift!r}, win={win!r}")

    N = math.prod(shape)
    # 1. rolled[p] = original flat index of the token that sits at rolled position p
    rolled = np.arange(N).reshape(shape)
    rolled = np.roll(rolled, shift=[-s for s in shift], axis=tuple(range(nd)))

    # 2. region labels on the rolled grid (all zero when there is no shift)
    region = np.zeros(shape, dtype=np.int64)
    if any(s > 0 for s in shift):
        slices_per_axis = []
        for w, s in zip(win, shift):
            if s > 0:
                slices_per_axis.append((slice(0, -w), slice(-w, -s), slice(-s, None)))
            else:
                slices_per_axis.append((slice(None),))
        cnt = 0
        for sl in itertools.product(*slices_per_axis):
            region[sl] = cnt
            cnt += 1

    # 3. windows over the rolled grid
    tok_windows = _window_partition(rolled, win)
    reg_windows = _window_partition(region, win)

    # 4. build the mask on original positions
    m = _empty(N, N)
    for toks, regs in zip(tok_windows, reg_windows):
        for a in range(len(toks)):
            for b in range(len(toks)):
                if regs[a] == regs[b]:
                    m[toks[a], toks[b]] = True
    return m


# --------------------------------------------------------------------------------------
# HaloNet, MaxViT, CSWin, MM-DiT
# --------------------------------------------------------------------------------------


def halo(shape, b, halo):
    """HaloNet blocked local self-attention: the grid is cut into b x b (x b) query blocks;
    every query of a block attends to the keys of that block extended by `halo` positions on
    every side, clipped at the border.  `b` and `halo` may be per-axis tuples.  When an axis is
    not divisible by b the last block is simply shorter."""
    shape = _check_shape(shape)
    nd = len(shape)
    b = _per_axis(b, nd, "b")
    halo_ = _per_axis(halo, nd, "halo")
    for bb, hh in zip(b, halo_):
        if bb < 1 or hh < 0:
            raise ValueError(f"halo: need block >= 1 and halo >= 0, got b={b!r}, halo={halo!r}")

    N = math.prod(shape)
    m = _empty(N, N)
    for qc in _coords(shape):
        ranges = []
        for a in range(nd):
            blk = qc[a] // b[a]
            block_start = blk * b[a]
            block_end = min(block_start + b[a], shape[a])  # exclusive
            lo = max(block_start - halo_[a], 0)
            hi = min(block_end + halo_[a], shape[a])
            ranges.append(range(lo, hi))
        qp = _flat(qc, shape)
        for kc in itertools.product(*ranges):
            m[qp, _flat(kc, shape)] = True
    return m


def maxvit_grid(shape, g):
    """MaxViT grid attention (the "global" half of multi-axis attention).

    MaxViT's grid_partition reshapes [H, W] to [g, H//g, g, W//g], moves the two g axes last
    and attends within each g x g group: the group of token (i, j) is (i % (H//g), j % (W//g)),
    i.e. the group is a sparse, dilated g x g grid of stride (H//g, W//g).  `g` may be a
    per-axis tuple.  H and W must be divisible by g.
    """
    shape = _check_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"maxvit_grid: expects a 2-D grid, got {shape!r}")
    gh, gw = _per_axis(g, 2, "g")
    H, W = shape
    if gh < 1 or gw < 1 or H % gh != 0 or W % gw != 0:
        raise ValueError(f"maxvit_grid: grid {shape!r} must be divisible by g={g!r}")

    idx = np.arange(H * W).reshape(H, W)
    # grid_partition: x.view(g, H//g, g, W//g).permute(H//g, W//g, g, g) -> groups of g*g
    groups = idx.reshape(gh, H // gh, gw, W // gw).transpose(1, 3, 0, 2).reshape(-1, gh * gw)
    m = _empty(H * W, H * W)
    for grp in groups:
        for a in grp:
            for c in grp:
                m[a, c] = True
    return m


def _stripe_groups(H, W, H_sp, W_sp):
    """CSWin's img2windows: [H, W] -> windows of H_sp x W_sp tokens (as flat positions)."""
    idx = np.arange(H * W).reshape(H, W)
    return idx.reshape(H // H_sp, H_sp, W // W_sp, W_sp).transpose(0, 2, 1, 3).reshape(-1, H_sp * W_sp)


def cswin(H, shape, sw, first_half="rows"):
    """CSWin cross-shaped window self-attention, [H, M, N].

    Heads are split in two parallel groups: the first H//2 heads attend within horizontal
    stripes of `sw` rows (same i // sw), the remaining heads within vertical stripes of `sw`
    columns (same j // sw) -- this is the paper's wording and the project's spec.

    NOTE: the official code (microsoft/CSWin-Transformer models/cswin.py) feeds the first
    half of the channels to branch idx=0, which uses H_sp = resolution, W_sp = split_size,
    i.e. *vertical* stripes (same j // sw) first.  Pass first_half="cols" to get that order.
    Each grid axis must be divisible by sw (as in img2windows).
    """
    shape = _check_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"cswin: expects a 2-D grid, got {shape!r}")
    if first_half not in ("rows", "cols"):
        raise ValueError(f"cswin: first_half must be 'rows' or 'cols', got {first_half!r}")
    Hg, Wg = shape
    if sw < 1 or Hg % sw != 0 or Wg % sw != 0:
        raise ValueError(f"cswin: grid {shape!r} must be divisible by sw={sw}")

    row_stripes = _stripe_groups(Hg, Wg, sw, Wg)  # H_sp = sw, W_sp = W  (horizontal)
    col_stripes = _stripe_groups(Hg, Wg, Hg, sw)  # H_sp = H,  W_sp = sw (vertical)
    first, second = (row_stripes, col_stripes) if first_half == "rows" else (col_stripes, row_stripes)

    N = Hg * Wg
    out = np.zeros((H, N, N), dtype=bool)
    for h in range(H):
        groups = first if h < H // 2 else second
        for grp in groups:
            for a in grp:
                for c in grp:
                    out[h, a, c] = True
    return out


def mmdit_local(T, shape, r):
    """MM-DiT joint attention with a local image window: T text tokens (positions 0..T-1)
    followed by the image grid `shape` (row-major).  Text tokens are global (every text query
    sees everything, every query sees every text key); an image query additionally sees the
    image keys within Euclidean radius r: sum of squared coordinate differences < r*r."""
    shape = _check_shape(shape)
    coords = _coords(shape)
    N = T + len(coords)
    m = _empty(N, N)
    for qa in range(N):
        for j in range(N):
            if qa < T or j < T:
                m[qa, j] = True
                continue
            qc = coords[qa - T]
            kc = coords[j - T]
            dist2 = sum((a - c) ** 2 for a, c in zip(qc, kc))
            m[qa, j] = dist2 < r * r
    return m


# --------------------------------------------------------------------------------------
# Sparse Transformer (Child et al., 2019), MoA (Fu et al., 2024)
# --------------------------------------------------------------------------------------


def sparse_strided(M, N, l):
    """Sparse Transformer strided attention, the merged-head form A1 | A2 (section 4.2):
    A1(i) = {t, t+1, ..., i} with t = max(0, i - l); A2(i) = {j : (i - j) mod l = 0}.
    The model is autoregressive, so only keys j <= i are ever attended."""
    m = _empty(M, N)
    for q in range(M):
        i = _absolute(q, M, N)
        for j in range(N):
            if j > i:
                continue
            a1 = max(0, i - l) <= j
            a2 = (i - j) % l == 0
            m[q, j] = a1 or a2
    return m


def sparse_fixed(M, N, l, c):
    """Sparse Transformer fixed attention, merged A1 | A2 (section 4.2):
    A1(i) = {j : floor(j / l) = floor(i / l)}; A2(i) = {j : j mod l in {l - c, ..., l}};
    autoregressive (j <= i)."""
    m = _empty(M, N)
    for q in range(M):
        i = _absolute(q, M, N)
        for j in range(N):
            if j > i:
                continue
            a1 = j // l == i // l
            a2 = l - c <= j % l <= l
            m[q, j] = a1 or a2
    return m


def moa(M, N, spans, sinks):
    """MoA: head h attends its `spans[h]` most recent tokens (itself included) plus the
    first `sinks` tokens, causally. `spans[h]` is the head's elastic rule alpha_h + beta_h * N
    already evaluated at this N. Returns [H, M, N]. Rows are filled with slices (the sizes
    in tests reach a few thousand keys)."""
    out = np.zeros((len(spans), M, N), dtype=bool)
    for h, span in enumerate(spans):
        for q in range(M):
            qa = _absolute(q, M, N)
            if qa < 0:
                continue
            out[h, q, max(0, qa - span + 1): qa + 1] = True  # the span ending at the query
            out[h, q, : min(sinks, qa + 1)] = True  # initial tokens, never ahead of the query
    return out


# --------------------------------------------------------------------------------------
# Vision: MaxViT block, axial, CrossFormer, HiLo, a video pattern, BiFormer
# --------------------------------------------------------------------------------------


def _groups_to_mask(groups, N):
    m = _empty(N, N)
    for grp in groups:
        for a in grp:
            for c in grp:
                m[a, c] = True
    return m


def maxvit_block(shape, p):
    """MaxViT block attention: block_partition reshapes [H, W] to [H//p, p, W//p, p] and
    attends within each p x p block.  H and W must be divisible by p."""
    shape = _check_shape(shape)
    H, W = shape
    if H % p or W % p:
        raise ValueError(f"maxvit_block: grid {shape!r} must be divisible by p={p}")
    idx = np.arange(H * W).reshape(H // p, p, W // p, p).transpose(0, 2, 1, 3).reshape(-1, p * p)
    return _groups_to_mask(idx, H * W)


def axial(shape, axis):
    """Axial attention along one axis of a 2-D image: axis 1 (width) is the row layer, where a
    pixel attends the pixels of its own row; axis 0 (height) is the column layer."""
    shape = _check_shape(shape)
    H, W = shape
    m = _empty(H * W, H * W)
    for (i, j) in _coords(shape):
        for (i2, j2) in _coords(shape):
            m[_flat((i, j), shape), _flat((i2, j2), shape)] = (i == i2) if axis == 1 else (j == j2)
    return m


def crossformer_sda(shape, G):
    """CrossFormer short-distance attention: x.reshape(B, H//G, G, W//G, G, C)
    .permute(0, 1, 3, 2, 4, 5) -- groups of G x G adjacent embeddings."""
    shape = _check_shape(shape)
    H, W = shape
    if H % G or W % G:
        raise ValueError(f"crossformer_sda: grid {shape!r} must be divisible by G={G}")
    idx = np.arange(H * W).reshape(H // G, G, W // G, G).transpose(0, 2, 1, 3).reshape(-1, G * G)
    return _groups_to_mask(idx, H * W)


def crossformer_lda(shape, I):
    """CrossFormer long-distance attention with interval I: x.reshape(B, H//I, I, W//I, I, C)
    .permute(0, 2, 4, 1, 3, 5) -- a group is every embedding whose coordinates agree modulo I."""
    shape = _check_shape(shape)
    H, W = shape
    if H % I or W % I:
        raise ValueError(f"crossformer_lda: grid {shape!r} must be divisible by I={I}")
    idx = np.arange(H * W).reshape(H // I, I, W // I, I).transpose(1, 3, 0, 2).reshape(-1, (H // I) * (W // I))
    return _groups_to_mask(idx, H * W)


def hilo(H, shape, s, alpha_lo):
    """HiLo attention, [H, M, N]. The official module gives the Lo-Fi branch
    l_heads = int(H * alpha) heads and the Hi-Fi branch the other H - l_heads, and
    concatenates (hifi, lofi) along channels, so Hi-Fi heads come first.
    Hi-Fi: attention inside each s x s window (x.reshape(B, H//s, s, W//s, s, C)).
    Lo-Fi: each query attends the s x s average-pooled keys of every window, so every token
    contributes to every query: as a token-level mask, all pairs.
    `alpha_lo` is the number of Lo-Fi heads (int(H * alpha))."""
    shape = _check_shape(shape)
    Hg, Wg = shape
    if Hg % s or Wg % s:
        raise ValueError(f"hilo: grid {shape!r} must be divisible by s={s}")
    n = Hg * Wg
    windows = np.arange(n).reshape(Hg // s, s, Wg // s, s).transpose(0, 2, 1, 3).reshape(-1, s * s)
    hifi = _groups_to_mask(windows, n)
    out = np.zeros((H, n, n), dtype=bool)
    for h in range(H):
        out[h] = hifi if h < H - alpha_lo else True
    return out


def video_window(shape, size, frames):
    """Frame-causal video attention with a spatial neighborhood on a (T, H, W) token volume:
    query (t, y, x) attends key (t2, y2, x2) iff t - frames < t2 <= t (its own and the
    previous frames - 1 frames) and (y2, x2) lies in NATTEN's size x size neighborhood of
    (y, x) (natten_axis on each spatial axis)."""
    shape = _check_shape(shape)
    T, Hg, Wg = shape
    ys = [natten_axis(Hg, y, size) for y in range(Hg)]
    xs = [natten_axis(Wg, x, size) for x in range(Wg)]
    n = T * Hg * Wg
    m = _empty(n, n)
    for (t, y, x) in _coords(shape):
        qp = _flat((t, y, x), shape)
        for t2 in range(max(0, t - frames + 1), t + 1):
            for y2 in ys[y]:
                for x2 in xs[x]:
                    m[qp, _flat((t2, y2, x2), shape)] = True
    return m


def biformer(q_img, k_img, region, topk):
    """BiFormer bi-level routing attention on an image, in the image's own row-major order.

    q_img, k_img: arrays [H, W, C] (one head's or the routing channels' queries and keys).
    region: (rh, rw), the size of a region; the image is cut into (H//rh) x (W//rw) regions,
    numbered row-major. Routing (paper, eq. 3-5): region-level queries and keys are the
    per-region means; A = Qr Kr^T; each query region keeps the indices of its `topk` largest
    entries. Token-to-token attention: a query attends every token of its routed regions.

    Returns (mask [N, N] bool over row-major pixels, routed int array [n_regions, topk])."""
    q_img = np.asarray(q_img, dtype=np.float64)
    k_img = np.asarray(k_img, dtype=np.float64)
    H, W, C = q_img.shape
    rh, rw = region
    if H % rh or W % rw:
        raise ValueError(f"biformer: image {H}x{W} must be divisible by the region {rh}x{rw}")
    nrh, nrw = H // rh, W // rw
    nreg = nrh * nrw

    def region_of(i, j):
        return (i // rh) * nrw + j // rw

    Qr = np.zeros((nreg, C))
    Kr = np.zeros((nreg, C))
    for i in range(H):
        for j in range(W):
            Qr[region_of(i, j)] += q_img[i, j] / (rh * rw)
            Kr[region_of(i, j)] += k_img[i, j] / (rh * rw)
    A = Qr @ Kr.T
    routed = np.zeros((nreg, topk), dtype=np.int64)
    for r in range(nreg):
        order = sorted(range(nreg), key=lambda c: -A[r, c])
        routed[r] = order[:topk]

    n = H * W
    m = _empty(n, n)
    for i in range(H):
        for j in range(W):
            allowed = set(routed[region_of(i, j)].tolist())
            for i2 in range(H):
                for j2 in range(W):
                    m[i * W + j, i2 * W + j2] = region_of(i2, j2) in allowed
    return m, routed
