"""A trellis layer's decode call as one native call, and the layers that read one input run as one call.

:class:`Step` holds one :class:`~mixq.runtime.kernels.tcq_cpu.GemvLayer` (in the interleaved layout or the byte
stream) and, for a one-sided ``+ip`` layer, its input transform (a :class:`~mixq.runtime.kernels.kron_cpu.KronPlan`):
``tcq_layers_call`` widens a bfloat16 input to float32, applies the transform through ``kron_apply``'s address, runs
the GEMV and writes bfloat16 -- the same values as the transform and the GEMV called one after the other, where the
Python between two native calls had cost a decode step about a tenth of its kernels' time.

The projections that read one input (q/k/v, gate/up) are learnt, not declared: in its first calls a step notes
whether the step called just before it read the same tensor with the same contents and the same transform; if so
it becomes that step's *follower*.  From then on the leader computes its followers' outputs in its own native call
(in the interleaved layout one parallel region, every layer's columns split over the threads, one barrier; from the
byte stream one layer after the other) and leaves each follower its output with the input it was computed from; a
follower returns it only when it is called with that very tensor, its bytes unchanged, and computes alone otherwise.
A stale or foreign input therefore costs speed, never correctness.  Decoding state (the last input seen) is per
process, not per thread: two models decoded in two threads at once learn nothing from each other (their inputs are
different tensors).
"""
from __future__ import annotations

import ctypes

import torch

from .cbuild import VOID_P
from .tcq_cpu import DENSE_FROM, GemvLayer, _lib

LEARN_CALLS = 4  # a step looks for the step it follows in its first calls (a decode step's first token suffices)
MAX_GROUP = 16   # tcq_layers_call's limit
INPUT_DTYPES = (torch.float32, torch.bfloat16)  # what a step reads


class _Layer(ctypes.Structure):  # tcq_layer in the C source
    _fields_ = ([("words", VOID_P), ("stream", VOID_P), ("scale", VOID_P), ("lut", VOID_P)]
                + [(n, ctypes.c_int) for n in ("R", "C", "P", "wbits", "k1", "L", "glen", "vec")]
                + [("rot", VOID_P), ("rot_plan", VOID_P)])


def _bytes(x: torch.Tensor) -> bytes:
    """The bytes of the contiguous CPU ``x`` (a step's input): what a stashed output is checked against, exactly
    at any size (a sum could miss an in-place change)."""
    return ctypes.string_at(x.data_ptr(), x.numel() * x.element_size())


_RECENT: list = [None]  # (step, x, bytes of x): the last step that computed from its own input


class Step:
    """One :class:`~mixq.runtime.kernels.tcq_cpu.GemvLayer` with the input transform ``rot`` (a ``KronPlan`` or None)
    as one native call, and the steps it learnt to run with it (:attr:`followers`)."""

    def __init__(self, gemv: GemvLayer, rot=None):
        if rot is not None and rot.n != gemv.C:
            raise ValueError(f"tcq Step: the transform is of order {rot.n}, the layer has {gemv.C} columns")
        self.R, self.C, self.rot = gemv.R, gemv.C, rot
        self._gemv = gemv
        words = gemv.words.data_ptr() if gemv.interleaved else None
        stream = None if gemv.interleaved else gemv.stream.data_ptr()
        self._layer = _Layer(words, stream, gemv.scale.data_ptr(), gemv.lut.data_ptr(), *gemv.layout, gemv.vec,
                             None if rot is None else rot.function, None if rot is None else rot.address)
        self._fn = _lib().tcq_layers_call
        self.followers: list[Step] = []
        self._stash = None  # (x, dtype, bytes of x, y): this step's output, computed by its leader
        self._calls = 0
        self._bind()

    def _bind(self) -> None:
        group = [self, *self.followers]
        self._ptrs = (ctypes.c_void_p * len(group))(*[ctypes.addressof(s._layer) for s in group])
        self._ys_type = ctypes.c_void_p * len(group)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``y [..., R]`` in ``dtype`` for the CPU ``x [..., C]`` (float32 or bfloat16, at most ``DENSE_FROM``
        rows)."""
        st = self._stash
        if st is not None:
            self._stash = None
            if st[0] is x and st[1] is dtype and st[2] == _bytes(x):
                return st[3]
        m = x.numel() // self.C
        if x.shape[-1] != self.C or x.dtype not in INPUT_DTYPES or m > DENSE_FROM:
            raise ValueError(f"tcq Step: x must be float32 or bfloat16 [..., {self.C}] with at most {DENSE_FROM} "
                             f"rows, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        if self._calls < LEARN_CALLS:
            self._calls += 1
            self._learn(x)
        bf16 = dtype is torch.bfloat16
        ydt, lead = torch.bfloat16 if bf16 else torch.float32, x.shape[:-1]
        ys = [torch.empty(*lead, self.R, dtype=ydt)] + [torch.empty(*lead, f.R, dtype=ydt) for f in self.followers]
        out = self._ys_type(*[y.data_ptr() for y in ys])  # per call: the native call runs without the GIL
        rc = self._fn(self._ptrs, len(ys), x.data_ptr(), out, m, x.dtype is torch.bfloat16, bf16)
        if rc:
            raise RuntimeError(f"tcq_layers_call failed ({rc}) on [{self.R}, {self.C}]")
        if not (bf16 or dtype is torch.float32):
            ys = [y.to(dtype) for y in ys]
        if self.followers:
            seen = _bytes(x)
            for f, y in zip(self.followers, ys[1:]):
                f._stash = (x, dtype, seen, y)
        return ys[0]

    def _learn(self, x: torch.Tensor) -> None:
        """Follow the step that computed just before from this same input (same columns, same transform), or be
        the one a next step may follow."""
        last = _RECENT[0]
        if (last is not None and last[1] is x and last[0] is not self and self not in last[0].followers
                and not self.followers and last[0].rot is self.rot and last[0].C == self.C
                and len(last[0].followers) + 1 < MAX_GROUP and last[2] == _bytes(x)):
            last[0].followers.append(self)
            last[0]._bind()
            return
        _RECENT[0] = (self, x, _bytes(x))

