"""Built-in steps; each module registers itself in :data:`nnsqueeze.registry.STEPS`.

There is no list of them here: :data:`~nnsqueeze.registry.STEPS` finds every module of this package
with :mod:`pkgutil` on its first lookup and imports it, so a new step is a new file.
"""
