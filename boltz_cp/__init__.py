"""boltz_cp: context-parallel Boltz-2 inference over a 2D device mesh."""

__version__ = "0.1.0"
