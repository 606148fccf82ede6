"""Pure-numpy twins of the compiled kernels, with the same signatures.

They are the specification the Cython kernels are tested against, and the
``backend="numpy"`` path of every façade. They are vectorised (no Python loop
per pixel), so that benchmark ratios against them are honest.
"""
