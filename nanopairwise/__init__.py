"""nanopairwise: a compact reference implementation of Pairwise-RL (arXiv 2504.04950).

Importing this package has no side effects. The math lives in the submodules:
model (transformer), tokenizer, data, formats, judge, scalar_head, reward, rollout, policy, losses
(the reference math), ops (kernel or reference), evaluation, tasks, bootstrap, distributed, common,
checkpoint, ppo_checkpoint, lora, gguf, guards, tracking; docs/DESIGN.md §2 says what each holds.
"""
