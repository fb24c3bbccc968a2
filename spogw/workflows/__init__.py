"""Workflows: the operators generated workflows call, their prompts and families as data, and validation.

``families.py`` loads which operators a benchmark family offers (``families/*.yaml``) and builds the
generator prompt; ``operators.py`` implements the operators; ``parsing.py`` turns generated text into
a validated workflow or a recorded reason. Running them is ``spogw.runtime.runner``'s job.
"""
