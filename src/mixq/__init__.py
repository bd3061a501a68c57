"""mixq: mixed-precision quantization of language models.

The stages are functions at the top level (:mod:`mixq.pipeline`; ``help(mixq.quantize)`` etc.)::

    import mixq

    model, tok = mixq.load_model("smollm2-135m")               # embedded, no network
    calib = mixq.build_calibration(model, tok, "ptb", nsamples=32, seqlen=512)
    table = mixq.measure(model, calib)                         # each layer's error under each candidate spec
    plan = mixq.plan(table, bpw=3.5)                           # exact solver under the budget
    # or both, with rotation first when asked: mixq.plan_for_budget(model, calib, mixq.Budget(bpw=3.5)).plan
    # input statistics once, saved and reused: mixq.statistics(model, calib).save("stats.safetensors")
    result = mixq.quantize(model, plan=plan, method="gptq", calib=calib)   # or mixq.quantize(model, "W4-g64")
    mixq.save_quantized("runs/mixed", model, tok, result)
    qmodel, qtok, info = mixq.load_quantized("runs/mixed")
    print(mixq.evaluate(qmodel, qtok, reference=mixq.load_model()[0], corpus="ptb")["kl"])

They are imported on first use: ``import mixq`` loads neither torch nor transformers.
``mixq.measure`` is both the stage function and the subpackage :mod:`mixq.measure` (calling the
subpackage runs the stage; ``from mixq.measure import ...`` and ``mixq.measure.driver`` work as before).
"""
import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first access
_LAZY: dict[str, str] = {
    # the stages
    "load_model": "mixq.pipeline:load_model",
    "build_calibration": "mixq.pipeline:build_calibration",
    "statistics": "mixq.pipeline:statistics",
    "measure": "mixq.pipeline:measure",
    "plan": "mixq.pipeline:plan",
    "plan_for_budget": "mixq.budget_stage:plan_for_budget",
    "quantize": "mixq.pipeline:quantize",
    "save_quantized": "mixq.pipeline:save_quantized",
    "load_quantized": "mixq.export.native:load_quantized",
    "evaluate": "mixq.eval.scorer:evaluate",
    "finetune": "mixq.pipeline:finetune",
    # the artifacts they pass along
    "Budget": "mixq.allocate:Budget",
    "BudgetPlan": "mixq.budget_stage:BudgetPlan",
    "Statistics": "mixq.calib.statistics:Statistics",
    "Plan": "mixq.allocate:Plan",
    "SensitivityTable": "mixq.allocate:SensitivityTable",
    "QuantResult": "mixq.api:QuantResult",
    "QuantSpec": "mixq.config:QuantSpec",
    "parse_spec": "mixq.config:parse_spec",
}
# stages that share their name with a subpackage: the subpackage object is made callable
_CALLABLE_SUBPACKAGES = frozenset({"measure"})

__all__ = list(_LAZY)


def _resolve(name: str):
    module, _, attr = _LAZY[name].partition(":")
    return getattr(_importlib.import_module(module), attr)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _CALLABLE_SUBPACKAGES:
        # importing it binds it on this package, which makes it callable (_Package.__setattr__)
        return _importlib.import_module(f"{__name__}.{name}")
    value = _resolve(name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableSubpackage(_types.ModuleType):
    """A subpackage that is also a stage: calling it calls the stage of the same name."""

    def __call__(self, *args, **kwargs):
        return _resolve(self.__name__.rpartition(".")[2])(*args, **kwargs)

    def _doc(self) -> str:  # the subpackage's docstring, then the stage's
        import inspect

        stage = _resolve(self.__name__.rpartition(".")[2])
        return (f"{inspect.cleandoc(self.__dict__.get('__doc__') or '')}\n\nCalled as a function, {self.__name__} "
                f"is {stage.__module__}.{stage.__qualname__}:\n\n{inspect.getdoc(stage)}").strip()

    __doc__ = property(_doc, lambda self, value: self.__dict__.__setitem__("__doc__", value))

    @property
    def __signature__(self):  # inspect.signature(mixq.measure) shows the stage's parameters
        import inspect

        return inspect.signature(_resolve(self.__name__.rpartition(".")[2]))


class _Package(_types.ModuleType):
    """``mixq`` itself: keeps a subpackage named like a stage callable, whoever imports it first."""

    def __setattr__(self, name: str, value) -> None:
        if (name in _CALLABLE_SUBPACKAGES and type(value) is _types.ModuleType
                and value.__name__ == f"{self.__name__}.{name}"):
            value.__class__ = _CallableSubpackage
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
