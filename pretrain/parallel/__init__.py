"""Everything that knows about ranks: the device mesh and the data, tensor and expert parallel wrappers.

Models never import from here (docs/architecture.md, rule 1): these functions are applied to a plain model.
"""
