"""Emu training platform: data, models, training, evaluation and pipelines for Emu/Emu2-style models.

Importing this package has no side effects (DESIGN.md, convention 4): heavy integrations (Ray, Great
Expectations, DVC, KFP, DeepSpeed) are imported only inside their adapter modules, when called.
"""

__version__ = "0.1.0"
