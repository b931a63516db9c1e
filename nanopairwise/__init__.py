"""nanopairwise: a compact reference implementation of Pairwise-RL (arXiv 2504.04950).

Importing this package has no side effects. The math lives in the submodules:
model (transformer), tokenizer, data, judge, rollout, losses (reference math), tasks, common.
"""
