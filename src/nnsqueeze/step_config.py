"""``StepConfig``: the base of every step's recipe config, below both :mod:`nnsqueeze.recipe` (which
holds configs in its ``StepEntry``) and :mod:`nnsqueeze.steps` (whose steps subclass it), so neither
imports the other for it. Every step accepts ``targets`` and ``ignore`` (see :mod:`nnsqueeze.targets`);
unknown keys are errors (``extra="forbid"``: config is data). ::

    >>> from nnsqueeze.step_config import StepConfig
    >>> class ScaleConfig(StepConfig):
    ...     factor: float = 1.0
    >>> ScaleConfig(targets=["Linear"]).model_dump()
    {'targets': ['Linear'], 'ignore': [], 'factor': 1.0}
    >>> ScaleConfig(factr=2.0)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for ScaleConfig
    ...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StepConfig(BaseModel):
    """Base config: every step accepts ``targets`` and ``ignore`` (see :mod:`nnsqueeze.targets`)."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = Field(default_factory=list, description="class names, module names or 're:' regexes; "
                               "empty means the step's default layer types")
    ignore: list[str] = Field(default_factory=list)
