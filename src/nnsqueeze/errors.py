"""Typed errors. Every error a user can cause derives from :class:`NnsqueezeError`.

The CLI turns any ``NnsqueezeError`` into a one-paragraph message and exit code 2;
anything else is a bug and keeps its traceback.

    >>> from nnsqueeze.errors import NnsqueezeError, RecipeError
    >>> raise RecipeError("steps[0].prune.sparsity", "must be in [0, 1)", fix="use e.g. 0.5")
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.RecipeError: steps[0].prune.sparsity: must be in [0, 1)
      fix: use e.g. 0.5
    >>> e = RecipeError("steps[0].prune.sparsity", "must be in [0, 1)", fix="use e.g. 0.5")
    >>> isinstance(e, NnsqueezeError), e.where, e.problem, e.fix
    (True, 'steps[0].prune.sparsity', 'must be in [0, 1)', 'use e.g. 0.5')
"""

from __future__ import annotations

from .limits import MAX_MESSAGE_CHARS, clip


class NnsqueezeError(Exception):
    """Base class: a problem with the user's input, with where it is and how to fix it."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        # A safety net under the per-site quoting (limits.quote): no part of a message may echo a
        # whole hostile input. The bound lives in limits.py (which needs this module for annotations only).
        where, problem = clip(str(where), MAX_MESSAGE_CHARS), clip(str(problem), MAX_MESSAGE_CHARS)
        fix = clip(str(fix), MAX_MESSAGE_CHARS) if fix else fix
        self.where, self.problem, self.fix = where, problem, fix
        msg = f"{where}: {problem}" if where else problem
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


class RecipeError(NnsqueezeError):
    """The recipe is malformed: bad YAML, unknown step or key, wrong type or value."""


class DataError(NnsqueezeError):
    """Data is missing, empty, of the wrong shape, or produces non-finite values."""


class MetricError(DataError):
    """A metric failed: the callable raised, or returned something that is not a finite number."""


class ModelError(NnsqueezeError):
    """The model cannot be loaded, has non-finite weights, or does not fit the recipe."""


class TargetError(RecipeError):
    """A ``targets``/``ignore`` selection matched nothing or is malformed."""


class ExportError(NnsqueezeError):
    """Export failed or the exported model disagrees with the torch simulation."""


class ArtifactError(NnsqueezeError):
    """An artifact directory is missing, corrupt, or of an unsupported format version."""
