"""The :class:`Step` plug-in contract. One technique per file in this package, registered by name.

A step is a config (pydantic, ``extra="forbid"``: config is data) plus a class that holds run
state. The runner calls :meth:`Step.run`; :meth:`Step.record` returns the JSON-able facts needed to
rebuild the structure on a fresh model (``nsq.load``), which :meth:`Step.rebuild` replays without
any data (the weights then come from ``model.safetensors``)::

    from nnsqueeze.registry import STEPS
    from nnsqueeze.steps.base import Step, StepConfig

    class ScaleConfig(StepConfig):
        factor: float = 1.0

    @STEPS.register("scale")
    class Scale(Step):
        Config = ScaleConfig
        def run(self, model, ctx):
            for name, layer in self.select(model, ctx, supported=(nn.Linear,)).layers:
                layer.weight.data *= self.config.factor
            return model
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..errors import ArtifactError, ModelError, TargetError
from ..limits import quote
from ..step_config import StepConfig
from ..targets import Selection, select

if TYPE_CHECKING:
    from ..context import Context


class Step:
    Config: ClassVar[type[StepConfig]] = StepConfig
    registered_name: ClassVar[str] = "step"
    # Default targets when the recipe gives none: class names of the layers this step handles.
    default_targets: ClassVar[list[str]] = []
    # Step-order contract, checked before any step runs (pipeline.check_order). The defaults
    # constrain nothing, so a third-party step is never rejected for flags it does not declare.
    # needs_float: works on float layers; no quantizing step may come before it.
    needs_float: ClassVar[bool] = False
    # quantizes: leaves layers quantized or low-precision (fake-quant, integer codes, fp16, k-means codes).
    quantizes: ClassVar[bool] = False
    # trainable_after (quantizing steps): a training step may follow (fake-quant layers with float
    # weights and clustered centroids train; fixed integer codes and fp16 weights do not).
    trainable_after: ClassVar[bool] = True
    # trains: a training step (finetune, distill); requires_training: needs one after it.
    trains: ClassVar[bool] = False
    requires_training: ClassVar[bool] = False

    def __init__(self, config: StepConfig, index: int = 0):
        self.config = config
        self.index = index  # position in the recipe, for error locations

    @property
    def where(self) -> str:
        return f"steps[{self.index}].{self.registered_name}"

    def select(self, model: nn.Module, ctx: "Context | None", supported: tuple[type, ...]) -> Selection:
        """Layers this step acts on; logs and reports skipped ones; errors when nothing is left."""
        targets = self.config.targets or list(self.default_targets)
        sel = select(model, targets, self.config.ignore, supported, where=f"{self.where}.targets",
                     strict=bool(self.config.targets))
        for name, reason in sel.skipped:
            if ctx is not None:
                ctx.skip(self.registered_name, name, reason)
        if not sel.layers:
            raise TargetError(f"{self.where}.targets", f"no supported layer selected by {targets} "
                              f"(ignore={self.config.ignore})",
                              fix=f"this step handles {', '.join(t.__name__ for t in supported)}")
        return sel

    def run(self, model: nn.Module, ctx: "Context") -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def onnx_limit(self) -> str | None:
        """Why this step's result cannot be exported to an ONNX file that ONNX Runtime runs (None: it
        can). The runner raises it as a RecipeError before any step runs when the recipe exports ONNX."""
        return None

    def record(self) -> dict[str, Any]:
        """JSON-able facts that :meth:`rebuild` needs (e.g. which layers were wrapped)."""
        return {}

    @classmethod
    def rebuild(cls, model: nn.Module, config: StepConfig, record: dict[str, Any]) -> nn.Module:
        """Recreate this step's structural changes on a fresh fp32 model, without data."""
        return model


def recorded_module(model: nn.Module, name: str, types: tuple[type, ...], where: str) -> nn.Module:
    """The module ``name`` of a fresh model during :meth:`Step.rebuild`, checked against ``types``."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"{where}: {name}", "layer not found in the model",
                         fix="load the artifact with the same model class it was made from") from None
    if not isinstance(mod, types):
        raise ModelError(f"{where}: {name}", f"expected {' or '.join(t.__name__ for t in types)}, found "
                         f"{type(mod).__name__}", fix="load the artifact with the same model class it was made from")
    return mod


# A manifest may be crafted: record values that size an allocation or index a module are checked
# against the layer they apply to before anything is built (a rank of 3e9 must not allocate).
def record_int(value: Any, lo: int, hi: int, where: str) -> int:
    """``value`` as an int in ``[lo, hi]``, else an :class:`ArtifactError` naming ``where``."""
    if type(value) is not int or not lo <= value <= hi:
        raise ArtifactError(where, f"{quote(value, 60)} is not an integer in [{lo}, {hi}] for this layer",
                            fix="re-create the artifact, and load it onto the architecture it was made from")
    return value


def record_indices(value: Any, n: int, where: str) -> list[int]:
    """``value`` as distinct ints in ``[0, n)`` (so at most ``n`` of them)."""
    if not isinstance(value, list) or len(value) > n or len(set(map(type, value)) - {int}) > 0 \
            or len(set(value)) != len(value) or (value and not 0 <= min(value) <= max(value) < n):
        raise ArtifactError(where, f"{quote(value, 80)} is not a list of distinct indices in [0, {n})",
                            fix="re-create the artifact, and load it onto the architecture it was made from")
    return value
