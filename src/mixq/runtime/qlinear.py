"""``QuantLinear``: a linear layer whose weight stays bit-packed, computed through a kernel.

::

    y = x Ŵᵀ + b        x [..., in], Ŵ [out, in] = dequantize(PackedWeight), y [..., out] in x.dtype

The packed tensors are buffers named like the native checkpoint (``<fqn>.codes``,
``<fqn>.scale`` | ``zero`` | ``offset`` | ``codebook`` | ``tensor_scale``).  Float params (fp16 / bf16
/ fp32 / e4m3 scales, offsets, codebooks) are held as their raw bits (int16 / int32 / uint8 views)
so that ``model.to(torch.bfloat16)`` cannot round them; :attr:`QuantLinear.packed` views them back.

``kernel="auto"`` picks per input dtype/device and number of rows from
:data:`mixq.runtime.kernels.AUTO_ORDER`; a kernel's one-time state (e.g. the CPU kernel's
int4pack copy) is built on first use and dropped when the buffers move or are reloaded.  A state
that holds every code (``cpu-int4``) replaces the packed code stream in RAM (``release_codes``).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..arch import get_weight, set_weight
from ..formats import QTensor
from ..formats.bitpack import PackedWeight, pack, packed_len
from .kernels import KERNELS, Kernel, canonical_name, pick_kernel, usable_kernels

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` / GPT-2 ``Conv1D`` holding a :class:`PackedWeight`.

    packed  the quantized ``[out, in]`` weight
    bias    optional ``[out]`` (kept in its own dtype, as a frozen parameter)
    kernel  ``"auto"`` or a name in :data:`mixq.runtime.kernels.KERNELS` (or an alias such as ``"cpu"``)
    release_codes  when a kernel's state holds every code (``cpu-int4``), free the packed code stream
            (``codes`` becomes an empty buffer) so the codes live in RAM once; :attr:`packed`,
            ``state_dict()``, ``.to()`` and ``load_state_dict`` rebuild the stream from the state.

    Per call, the kernel is looked up in a cache keyed by ``(dtype, device)`` (then chosen by the number
    of rows); :attr:`last_kernel` names the kernel the last call used.
    """

    packed_layer = True  # memory_report / kernel_usage count it (False when nested in another packed layer)

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 release_codes: bool = True):
        super().__init__()
        kernel = canonical_name(kernel)  # fail early on a typo
        self.spec = packed.spec
        self.out_features, self.in_features = packed.shape
        self.kernel = kernel
        self.release_codes = release_codes
        self._dtypes = {name: t.dtype for name, t in packed.tensors().items()}
        self._codes_len = packed_len(packed.numel, packed.spec.bits)
        if packed.codes.numel() != self._codes_len:
            raise ValueError(f"{packed.spec.name} {packed.shape}: codes hold {packed.codes.numel()} bytes, "
                             f"expected {self._codes_len}")
        for name, t in packed.tensors().items():
            self.register_buffer(name, _raw_bits(t))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._usable: dict[tuple, list[Kernel]] = {}
        self._state: dict[str, object] = {}
        self._pw: PackedWeight | None = None
        self._released: str | None = None  # name of the kernel whose state holds the codes
        self.last_kernel: str | None = None

    @classmethod
    def from_qtensor(cls, q: QTensor, bias: torch.Tensor | None = None, kernel: str = "auto",
                     release_codes: bool = True) -> "QuantLinear":
        return cls(PackedWeight.from_qtensor(q), bias, kernel, release_codes)

    # ------------------------------------------------------------------ packed weight views
    def _tensors(self, codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).view(dt) for n, dt in self._dtypes.items()}
        if codes is not None:
            out["codes"] = codes
        return out

    def _header(self) -> PackedWeight:
        """The packed weight as held now (``codes`` may be empty once released): for kernel checks."""
        if self._pw is not None:
            return self._pw
        return PackedWeight.from_tensors(self._tensors(), self.spec, (self.out_features, self.in_features))

    @property
    def packed(self) -> PackedWeight:
        """The :class:`PackedWeight` (codes rebuilt from the kernel state, uncached, if they were released)."""
        if self._pw is not None:
            return self._pw
        shape = (self.out_features, self.in_features)
        if self._released is not None:
            return PackedWeight.from_tensors(self._tensors(self._codes_from_state()), self.spec, shape)
        self._pw = PackedWeight.from_tensors(self._tensors(), self.spec, shape)
        return self._pw

    def _codes_from_state(self) -> torch.Tensor:
        k = KERNELS[self._released]
        codes = k.codes_from_state(self._state[self._released])
        return pack(codes.to(self.codes.device), self.spec.bits)

    @property
    def codes_released(self) -> bool:
        return self._released is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (codes at their packed size even if released; bias and kernel state
        not included)."""
        params = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._dtypes if n != "codes")
        return self._codes_len + params

    @property
    def state_nbytes(self) -> int:
        """Bytes held by kernel states (e.g. ``cpu-int4``'s int4pack copy and bf16 scales)."""
        storages: dict[int, int] = {}

        def walk(x) -> None:  # states nest tensors in dicts and lists (e.g. cpu-int4's planes)
            if isinstance(x, torch.Tensor):
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(list(self._state.values()))
        return sum(storages.values())

    @property
    def resident_nbytes(self) -> int:
        """Bytes this layer holds now: buffers (an empty code stream once released) + bias + kernel states."""
        bufs = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return bufs + bias + self.state_nbytes

    # ------------------------------------------------------------------ compute
    def kernel_for(self, x: torch.Tensor) -> Kernel:
        """The kernel for ``x [..., in]``: usable ones cached per dtype and device, then chosen by ``M``."""
        usable = self._usable.get((x.dtype, x.device))
        if usable is None:
            usable = self._usable[(x.dtype, x.device)] = usable_kernels(self.kernel, self._header(), x)
        n = x.numel() // max(x.shape[-1], 1)
        return pick_kernel(usable, n, self.kernel == "auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        in_f = self.in_features
        if shape[-1] != in_f:
            raise ValueError(f"QuantLinear expects inputs [..., {in_f}], got {tuple(shape)}")
        x2 = x.reshape(-1, in_f)
        kernel = self.kernel_for(x2)
        name = kernel.name
        state = self._state.get(name, _UNSET)
        if state is _UNSET:
            state = self._prepare(kernel)
        if self.last_kernel is not name:
            self.__dict__["last_kernel"] = name  # plain attribute: skip nn.Module.__setattr__ on the hot path
        y = kernel.linear(x2, self.packed if kernel.needs_packed else None, state, self.bias)
        return y if len(shape) == 2 else y.view(*shape[:-1], self.out_features)

    def _prepare(self, kernel: Kernel):
        state = kernel.prepare(self.packed)
        self._state[kernel.name] = state
        if (self.release_codes and self._released is None and kernel.codes_from_state is not None
                and isinstance(state, dict) and state.get("holds_codes")):
            self._released = kernel.name
            self._pw = None
            self.codes = torch.empty(0, dtype=torch.uint8, device=self.codes.device)
        return state

    # ------------------------------------------------------------------ module plumbing
    def _restore_codes(self) -> None:
        if self._released is not None:
            codes = self._codes_from_state()
            self._released = None
            self.codes = codes

    def _drop_cache(self) -> None:
        self._restore_codes()
        self._usable.clear()
        self._state.clear()
        self._pw = None

    def _apply(self, fn, *args, **kwargs):
        self._drop_cache()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released is not None:
            destination[prefix + "codes"] = self._codes_from_state()

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


_UNSET = object()


def install_qlinear(model: nn.Module, weights: dict[str, PackedWeight], kernel: str = "auto",
                    release_codes: bool = True, layer=None) -> nn.Module:
    """Replace every ``fqn`` of ``weights`` (an ``nn.Linear`` or ``Conv1D``) by a :class:`QuantLinear`, in place.

    The module's bias is kept; its weight is dropped (nothing else is written, so a weight tied to
    another module keeps that module's copy).  ``layer(packed, bias)``: the module to put there instead
    (:func:`mixq.runtime.layers.install_layers`: a composite's own layer).  Returns ``model``.
    """
    for fqn, pw in weights.items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError as e:
            raise ValueError(f"{fqn} is not a module of {type(model).__name__}: keys are module fqns") from e
        if not isinstance(mod, (nn.Linear, Conv1D)):
            raise TypeError(f"{fqn} is a {type(mod).__name__}, not nn.Linear/Conv1D: only linears become "
                            "QuantLinear; fake-quantize it instead (set_weight(module, dequantize(q)))")
        if tuple(get_weight(mod).shape) != tuple(pw.shape):
            raise ValueError(f"{fqn}: quantized shape {tuple(pw.shape)} != module weight [out, in] "
                             f"{tuple(get_weight(mod).shape)}")
        device = mod.weight.device if mod.weight.device.type != "meta" else torch.device("cpu")
        qlin = (QuantLinear(pw, mod.bias, kernel, release_codes) if layer is None else layer(pw, mod.bias)).to(device)
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, qlin)
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes a model holds: ``params_buffers`` (each tensor once), ``kernel_state`` (what the packed layers'
    kernels made on first use: QuantLinear's kernel layouts, the codebook layers' copies and tables), ``resident``
    (their sum), ``packed_weights`` (QuantLinear and intra-tensor CompositeLinear
    weights at their packed size) and ``quant_linears`` (count).  A packed layer is a module whose
    ``packed_layer`` attribute is true (QuantLinear, and :mod:`mixq.runtime.composite_linear`'s layers)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    layers = [m for m in model.modules() if getattr(m, "packed_layer", False)]
    state = sum(getattr(m, "state_nbytes", 0) for m in model.modules())  # an +ip layer's inner layer holds its own
    return {"params_buffers": total, "kernel_state": state, "resident": total + state,
            "packed_weights": sum(m.nbytes for m in layers), "quant_linears": len(layers)}


def kernel_usage(model: nn.Module) -> dict[str, int]:
    """How many QuantLinear (and intra-tensor CompositeLinear) layers last ran each kernel (``"unused"``: not
    called yet)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if getattr(m, "packed_layer", False):
            k = m.last_kernel or "unused"
            out[k] = out.get(k, 0) + 1
    return out


def quantize_to_qlinear(model: nn.Module, qtensors: dict[str, QTensor], kernel: str = "auto",
                        release_codes: bool = True) -> nn.Module:
    """Replace every ``fqn`` of ``qtensors`` (an ``nn.Linear`` or ``Conv1D``) by a :class:`QuantLinear`, in place.

    ``qtensors[fqn]`` is the ``[out, in]`` weight (:func:`mixq.arch.get_weight` orientation).  A weight
    tied to another module (lm_head and embeddings) is also overwritten with ``Ŵ`` there, so the
    result computes the same logits as the fake-quant model.  Returns ``model``.
    """
    shared = _shared_weights(model)
    mods = dict(model.named_modules())
    weights = {fqn: PackedWeight.from_qtensor(q) for fqn, q in qtensors.items()}
    for fqn, pw in weights.items():
        mod = mods.get(fqn)
        if isinstance(mod, (nn.Linear, Conv1D)) and tuple(get_weight(mod).shape) == tuple(pw.shape) \
                and len(shared.get(mod.weight.data_ptr(), ())) > 1:
            log.info("%s shares its weight with %s: writing the dequantized weight there too",
                     fqn, [n for n in shared[mod.weight.data_ptr()] if n != fqn])
            set_weight(mod, pw.dequantize().to(mod.weight.dtype))
    return install_qlinear(model, weights, kernel, release_codes)


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as an integer tensor of the same width (dtype casts skip integer buffers)."""
    if not t.is_floating_point():
        return t
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``data_ptr -> module names`` of every module ``weight`` (ties show up as lists of 2+)."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.data_ptr():
            out.setdefault(w.data_ptr(), []).append(name)
    return out
