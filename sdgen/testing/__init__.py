"""Builders for tiny random-weight checkpoints in the original LDM key layout (tests and bench share them)."""
