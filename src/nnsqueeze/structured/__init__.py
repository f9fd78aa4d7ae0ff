"""Structured pruning: a channel dependency graph (:mod:`.graph`), per-layer shrinking
(:mod:`.pruners`), importance criteria (:mod:`.importance`, one file each), MACs/params counting
(:mod:`.macs`). The recipe step is ``structured-prune`` (:mod:`nnsqueeze.steps.channel_prune`)."""
