"""Expert pruning and merging math as plain tensor functions (no model plumbing).

* :mod:`moecompress.algorithms.pruning` — which experts to keep (frequency, REAP, DERN importance) and
  DERN's neuron-level recombination of dropped experts into retained ones.
* :mod:`moecompress.algorithms.merging` — M-SMoE: permutation alignment, frequency-guided grouping,
  frequency-weighted merging, and router rows for a merged checkpoint.
* :mod:`moecompress.algorithms.routing_stats` — router-statistics math: top-k selections, routing-weight
  sums, co-activation, router-logit Gram / cosine, load CV, starved experts.

Expert weights use the canonical ``nn.Linear`` layout: per expert ``gate [I, H]``, ``up [I, H]``,
``down [H, I]``; a layer's experts stacked as ``[E, I, H]`` / ``[E, H, I]``; gateless experts pass
``gate=None``.
"""
