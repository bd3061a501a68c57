"""Native CPU kernels of trellis-coded weights (:mod:`mixq.algorithms.composite.tcq`): the Viterbi search and
decode-and-dot GEMV.

``tcq_viterbi`` finds, for each of ``N`` sequences of ``T`` targets ``x`` with weights ``w``, the bit string of
least ``Σ_t w_t (x_t - lut[s_t])²`` through the bitshift trellis of :mod:`mixq.formats.composite.tcq_codebook` (state
``s_t = ((s_{t-1} << k_t) | b_t) mod 2^L``, ``s_{-1} = 0``).  The survivors of a step are indexed by the state's
low ``L - k_t`` bits shifted up (every state with the same ``s >> k_t`` has the same ``2^{k_t}`` predecessors), so a
step costs ``2^L`` compares and ``2^L`` squared errors; back-pointers take ``T · 2^{L - k_min}`` bytes.  The compare
takes min and argmin at once as integers (a cost is >= 0, so its float bits order as integers) with the
predecessor's index in the low 4 mantissa bits (6 for steps of 5-6 bits): costs lose 2^-19 (2^-17) of relative
precision, the search 1.5x of time.  The
new costs ``m[s >> k] + w (x - lut[s])²`` are written eight states a vector where the CPU has AVX2 (the compiler
otherwise vectorizes across predecessors with strided stores): 1.3-3x faster at 2.5-4 bits a weight, the same bits
(one thread, 256 x 576 targets, L = 8 and 10; measured against the scalar loop).  Sequences are split over OpenMP
threads.

``tcq_sweep``: GPTQ's column sweep through the trellis (:class:`SweepSearch`): a block's columns searched one after
another on the calling thread, each column's error fed to the block's later columns in C, where the torch loop's
tensor operations around each search had cost a column of the measurement's 256 rows (8 state bits) several times
the search itself: on SmolLM2's layers 2.5-4x faster at 8 state bits, 1.3-1.8x for the walk's ``TCQ3L12`` on all
rows, the same bits to the last one (bench/results/gptq_sweep.md).

``tcq_decode``: ``Ŵ`` from the stream, a column per thread step.  ``tcq_gemv``: ``y[m, r] = Σ_g s[r, g] Σ_{j in g} x[m, j] · lut[state(r, j)]`` from the column-major symbol stream
(``w``-bit symbols, LSB-first packed, one per ``P`` rows of a column): each thread walks whole columns of its
column range, four at a time so that four state chains run side by side, into a private partial sum -- or, where
the CPU has AVX2 (and the scale groups are a multiple of 8 columns), eight columns at once, one state chain per
vector lane, with a gather for each lane's symbols (every few rows) and one for its table entries (every row):
2-2.5x faster than the scalar path on one EPYC thread.  For up to ``DENSE_FROM`` tokens (decoding), where the CPU
has AVX-512 or AVX2 and the scale groups are a multiple of 16 columns, :class:`GemvLayer` holds a lane-interleaved
copy of the stream instead of the stream (:func:`words`) and walks 64 columns at once in four sixteen-lane vectors
(AVX2: 32 columns in four eight-lane ones): a plain load refills the lanes' symbols, and each row's four table
gathers meet in registers before one accumulator update (up to four tokens share each gather); more tokens decode
``Ŵ`` from the same layout for a dense product (C sources: :mod:`mixq.runtime.kernels.tcq_words_csrc`,
:mod:`mixq.runtime.kernels.tcq_words_avx2_csrc`).  A layer's
decode call, from either layout, is one native call (:class:`~mixq.runtime.kernels.tcq_step.Step`: the bfloat16
input widened, an ``+ip`` layer's input transform through :mod:`mixq.runtime.kernels.kron_cpu`'s function, the
GEMV, bfloat16 out), where the Python between two native calls had cost a decode step about a tenth of its
kernels' time (the AVX2 path of this Xeon, built with ``-mno-avx512f``: 0.98x -> 1.13x fp32 on two threads).  The table
gathers bound every path: a gather costs about half a cycle a lane.

Compiled on first use (:func:`mixq.runtime.kernels.cbuild.load`); :func:`available` is False when no compiler
works, and the callers fall back to torch (:func:`mixq.algorithms.composite.tcq_search.viterbi_torch`, dequantize +
dense GEMM).
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from .cbuild import INT, VOID_P, load
from .sweep_csrc import FEED, check_block
from .tcq_csrc import SOURCE as SEARCH_SOURCE
from .tcq_gemv_csrc import SOURCE as GEMV_SOURCE
from .tcq_step_csrc import SOURCE as STEP_SOURCE
from .tcq_words_avx2_csrc import SOURCE as WORDS_AVX2_SOURCE
from .tcq_words_csrc import SOURCE as WORDS_SOURCE


@lru_cache(maxsize=1)
def _lib():
    return load("tcq_cpu", FEED + SEARCH_SOURCE + GEMV_SOURCE + WORDS_SOURCE + WORDS_AVX2_SOURCE + STEP_SOURCE,
                "trellis layers search and decode in torch (slow)", {
        "tcq_viterbi": (ctypes.c_int, [VOID_P] * 3 + [INT] * 2 + [VOID_P, INT] + [VOID_P] * 3),
        "tcq_sweep": (ctypes.c_int, [VOID_P] * 3 + [INT] * 5 + [VOID_P] * 4 + [INT] + [VOID_P] * 2),
        "tcq_decode": (None, [VOID_P] * 4 + [INT] * 7),
        "tcq_gemv": (None, [VOID_P] * 5 + [INT] * 9),
        "tcq_words_isa": (ctypes.c_int, []),
        "tcq_words": (None, [VOID_P] * 2 + [INT] * 4),
        "tcq_gemv_words": (None, [VOID_P] * 5 + [INT] * 9),
        "tcq_decode_words": (None, [VOID_P] * 4 + [INT] * 7),
        "tcq_layers_call": (ctypes.c_int, [VOID_P, INT, VOID_P, VOID_P] + [INT] * 3)})


def available() -> bool:
    return _lib() is not None


@lru_cache(maxsize=1)
def words_isa() -> int:
    """Which kernels of the interleaved layout (:func:`words`) the compiled library holds: 512 (the CPU has
    AVX-512F), 256 (AVX2), 0 (none: the byte stream's scalar path)."""
    return 0 if _lib() is None else int(_lib().tcq_words_isa())


def has_avx512() -> bool:
    """Whether the compiled kernels hold the AVX-512 paths (the CPU has AVX-512F)."""
    return words_isa() == 512


def words(stream: torch.Tensor, R: int, C: int, P: int, wbits: int) -> torch.Tensor:
    """The interleaved layout's copy of a column-major symbol ``stream`` (``tcq_words`` in the C source): for
    each group of 16 columns, their ``k``-th 32-bit words side by side, a word holding ``K = 32 // wbits`` whole
    symbols: int32 ``[C / 16, ceil((R / P) / K), 16]``, ``32 / K`` bits a symbol where the stream has ``wbits``
    (at most 8/7 of its size: 7-bit symbols, four to a word)."""
    per = 32 // wbits
    out = torch.empty(C // 16, -(-(R // P) // per), 16, dtype=torch.int32)
    _lib().tcq_words(stream.data_ptr(), out.data_ptr(), R, C, P, wbits)
    return out


def viterbi(x: torch.Tensor, w: torch.Tensor, ks: torch.Tensor, lut: torch.Tensor, L: int):
    """``(bits uint8 [N, T], values float32 [N, T], cost float32 [N])`` from the native search (``values``: the
    table entry each step decodes to), or None when it is not available."""
    lib = _lib()
    if lib is None:
        return None
    x, w = x.detach().float().contiguous(), w.detach().float().contiguous()
    ks, lut = ks.to(torch.uint8).contiguous(), lut.float().contiguous()
    N, T = x.shape
    out = torch.empty(N, T, dtype=torch.uint8)
    vals = torch.empty(N, T, dtype=torch.float32)
    cost = torch.empty(N, dtype=torch.float32)
    rc = lib.tcq_viterbi(x.data_ptr(), w.data_ptr(), ks.data_ptr(), N, T, lut.data_ptr(), L, out.data_ptr(),
                         vals.data_ptr(), cost.data_ptr())
    if rc:
        raise ValueError(f"tcq_viterbi: unsupported trellis (L={L}, step bits {sorted(set(ks.tolist()))}): "
                         "L must be 8, 10 or 12 and every step 1..6 bits")
    return out, vals, cost


class SweepSearch:
    """GPTQ's column sweep through the trellis at one rate, natively (``tcq_sweep`` in the C source): :meth:`run`
    searches columns ``ja .. jb - 1`` of a block held column by column (``Wt [nb, R]``), each at the row scales and
    search weights of :meth:`scales`, writes their bits and errors and feeds each error to the block's later columns
    -- the arithmetic of :func:`mixq.algorithms.sweep.sweep` with :func:`viterbi` as its rounding step, without the
    tensor operations of each step (they cost a column of a few hundred rows several times its search).  None from
    :meth:`make` without the kernel."""

    def __init__(self, lib, ks: torch.Tensor, lut: torch.Tensor, L: int):
        self._fn = lib.tcq_sweep
        self.ks, self.lut, self.L = ks.to(torch.uint8).contiguous(), lut.float().contiguous(), L
        self.R = self.ks.numel()
        self._s = self._ws = None

    @classmethod
    def make(cls, ks: torch.Tensor, lut: torch.Tensor, L: int) -> "SweepSearch | None":
        lib = _lib()
        return None if lib is None else cls(lib, ks, lut, L)

    def scales(self, s: torch.Tensor, ws: torch.Tensor) -> None:
        """The row scales and search weights of the columns that follow (float32 ``[R]``)."""
        self._s, self._ws = s.float().contiguous(), ws.float().contiguous()

    def run(self, Wt: torch.Tensor, Et: torch.Tensor, U: torch.Tensor, ja: int, jb: int, bits: torch.Tensor,
            vals: torch.Tensor) -> None:
        """Columns ``ja .. jb - 1`` of the block ``Wt [nb, R]`` (float32, contiguous; updated in place), their errors
        into ``Et [nb, R]``, their bits into ``bits [nb, R]`` (uint8) and the table values they decode to into ``vals
        [nb, R]`` (all contiguous); ``U`` the block's rows of the inverse Hessian's upper Cholesky factor, ``[nb, >=
        nb]`` float32 with unit column stride."""
        nb, R = check_block("tcq sweep", self.R, U, {"Wt": Wt, "Et": Et, "vals": vals}, {"bits": bits})
        rc = self._fn(Wt.data_ptr(), Et.data_ptr(), U.data_ptr(), U.stride(0), nb, ja, jb, R, self._s.data_ptr(),
                      self._ws.data_ptr(), self.ks.data_ptr(), self.lut.data_ptr(), self.L, bits.data_ptr(),
                      vals.data_ptr())
        if rc:
            raise ValueError(f"tcq_sweep: unsupported trellis (L={self.L}, step bits "
                             f"{sorted(set(self.ks.tolist()))}): L must be 8, 10 or 12 and every step 1..6 bits")


def _check_layout(what: str, stream: torch.Tensor, scale: torch.Tensor, R: int, C: int, P: int, wbits: int,
                  glen: int) -> int:
    """The stream's bit count for ``[R, C]`` at ``wbits`` bits per ``P`` rows; ValueError when the stream (padded by
    >= 1 byte) or the scales ``[R, C / glen]`` do not fit that shape."""
    bits = (R // P) * C * wbits
    if R % P or C % glen or tuple(scale.shape) != (R, C // glen) or stream.numel() * 8 < bits + 8:
        raise ValueError(f"tcq {what}: stream {stream.numel()} bytes, scale {tuple(scale.shape)} do not fit "
                         f"[{R}, {C}] at {wbits} bits per {P} rows")
    return bits


ISA = {"scalar": 0, "auto": 1, "avx2": 2}  # the kernel's ``vec`` argument for each path choice
DENSE_FROM = 16  # from the interleaved layout, more tokens than this: decode + dense product (fewer: the GEMV)


def gemv(x: torch.Tensor, stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, R: int, P: int,
         wbits: int, k1: int, L: int, glen: int, *, isa: str = "auto") -> torch.Tensor:
    """``y [M, R]`` float32 for ``x [M, C]`` from a column-major symbol ``stream`` (uint8, padded by >= 2 bytes).
    ``isa="auto"``: the widest path the CPU and the layout allow -- the interleaved layout's AVX-512 or AVX2 kernels
    (a dense product above ``DENSE_FROM`` tokens) with scale groups of a multiple of 16 columns, else the byte
    stream's AVX2 path with groups of a multiple of 8 (both need 4 bytes of padding), else scalar; ``"avx2"`` (the
    byte stream's) / ``"scalar"`` cap it there.  One call of
    :class:`GemvLayer`."""
    x = x.detach().float()
    return GemvLayer(stream, scale, lut, R, x.shape[1], P, wbits, k1, L, glen, isa=isa)(x)


class GemvLayer:
    """One layer's fixed :func:`gemv` arguments, checked once (a decode step calls the kernel ~200 times: the
    per-call argument work of :func:`gemv` is a tenth of a step)."""

    def __init__(self, stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, R: int, C: int, P: int,
                 wbits: int, k1: int, L: int, glen: int, *, isa: str = "auto"):
        if _lib() is None:
            raise RuntimeError("the tcq-cpu kernel is not available (no working C compiler)")
        self.stream, self.scale = stream.contiguous(), scale.float().contiguous()
        self.lut = lut.float().contiguous()
        bits = _check_layout("gemv", stream, self.scale, R, C, P, wbits, glen)
        if isa not in ISA:
            raise ValueError(f"tcq gemv: isa must be one of {sorted(ISA)}, got {isa!r}")
        vec = ISA[isa] if stream.numel() * 8 >= bits + 32 and bits + 32 < 2**31 else 0
        self.R, self.C = R, C
        self._args = (self.stream.data_ptr(), self.scale.data_ptr(), self.lut.data_ptr())
        self.layout, self.vec = (R, C, P, wbits, k1, L, glen), vec  # the kernels' shape and path arguments
        # AVX-512 or AVX2 (isa "auto", scale groups of 16 columns): the interleaved layout replaces the byte stream
        self.interleaved = isa == "auto" and vec == 1 and glen % 16 == 0 and words_isa() > 0
        self.words: torch.Tensor | None = None
        if self.interleaved:
            self.words, self.stream = words(self.stream, R, C, P, wbits), None
            self._args = (self.words.data_ptr(), *self._args[1:])

    def dense(self) -> torch.Tensor:
        """``Ŵ [R, C]`` float32 (:func:`decode`; from the interleaved layout where this layer has it, 16 columns a
        step)."""
        if not self.interleaved:
            return decode(self.stream, self.scale, self.lut, *self.layout)
        W = torch.empty(self.R, self.C, dtype=torch.float32)
        _lib().tcq_decode_words(*self._args, W.data_ptr(), *self.layout)
        return W

    def tensors(self) -> list[torch.Tensor]:
        """What this kernel holds: the padded stream or the interleaved layout, the scales and the table."""
        return [t for t in (self.stream, self.words, self.scale, self.lut) if t is not None]

    def __call__(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``y [M, R]`` for the float32 ``x [M, C]``: float32, or ``dtype`` (rounded from the float32 sums; from the
        interleaved layout the kernel writes bfloat16 itself)."""
        if x.dim() != 2 or x.shape[1] != self.C:
            raise ValueError(f"tcq gemv: x must be [M, {self.C}], got {tuple(x.shape)}")
        x = x.contiguous()
        if self.interleaved:  # from its layout; more than DENSE_FROM tokens: the weight decoded once, a dense product
            M = x.shape[0]
            if M > DENSE_FROM:
                return (x @ self.dense().T).to(dtype)
            bf16 = dtype is torch.bfloat16
            y = torch.empty(M, self.R, dtype=torch.bfloat16 if bf16 else torch.float32)
            _lib().tcq_gemv_words(x.data_ptr(), *self._args, y.data_ptr(), M, *self.layout, bf16)
            return y if bf16 or dtype is torch.float32 else y.to(dtype)
        y = torch.empty(x.shape[0], self.R, dtype=torch.float32)
        _lib().tcq_gemv(x.data_ptr(), *self._args, y.data_ptr(), x.shape[0], *self.layout, self.vec)
        return y.to(dtype)


def decode(stream: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, R: int, C: int, P: int, wbits: int, k1: int,
           L: int, glen: int) -> torch.Tensor | None:
    """``Ŵ [R, C]`` float32 from a padded column-major symbol ``stream``, or None without the kernel."""
    lib = _lib()
    if lib is None:
        return None
    scale, lut = scale.float().contiguous(), lut.float().contiguous()
    _check_layout("decode", stream, scale, R, C, P, wbits, glen)
    W = torch.empty(R, C, dtype=torch.float32)
    lib.tcq_decode(stream.contiguous().data_ptr(), scale.data_ptr(), lut.data_ptr(), W.data_ptr(), R, C, P, wbits,
                   k1, L, glen)
    return W
