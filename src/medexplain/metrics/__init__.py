"""Faithfulness and localization metrics."""
