"""ramp's trainer: ``torchrun -m trainer.main [overrides]`` trains a causal language model from scratch.

The modules, from the front door down: ``main`` (compose, plan, build, fit), ``loop`` (the global
step), ``resume`` (where a run starts), ``backends`` (DDP, DeepSpeed), ``data``, ``models``,
``observe`` (what rank 0 prints and records), ``schedules`` and ``config`` (what a run is).
"""
