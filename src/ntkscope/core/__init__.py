"""The bottom layer: probes, the result type, the jackknife, executors and memory budgets.

Imports only torch, numpy and scipy; every other layer builds on it
(core ← operators ← {models, estimators} ← metrics ← front ends).
"""
