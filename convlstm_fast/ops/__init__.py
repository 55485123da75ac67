"""Shared wiring of the registered layer ops (autograd, fake tensors, flop formulas)."""
