"""Reports of the comparison: figures (:mod:`.plots`) and allocation inspection (:mod:`.inspect`).

matplotlib is imported only when a figure module is imported, so ``import mixq`` stays light.
"""
