"""SPOGW: score-based preference optimization via group-wise comparison.

`import spogw` stays light: torch, transformers, Lightning and the optional backends are
imported by the modules that need them, not here.
"""

__version__ = "0.1.0"
