"""Shipping a trained run: merge adapters into the base, export to other formats."""
