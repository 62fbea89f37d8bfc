"""Benchmarks behind docs/benchmarks.md; they need torch (the dev environment, .venv).

models       random-weight models of the original's shape, as kennel model directories
serve        kennel-bench-serve: the serving image against its in-process engine and the original's way
budget       kennel-bench-budget: memory and time of each hostile request on a worker's own path
train        kennel-bench-train: the training loop against its baselines
distributed  kennel-bench-distributed: one host against two on this machine
"""
