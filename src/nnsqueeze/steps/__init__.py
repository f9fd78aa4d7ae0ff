"""Built-in steps; each module registers itself in :data:`nnsqueeze.registry.STEPS`."""

__all__ = ["prune", "finetune", "quantize"]
