"""Evaluation (paper §6): benchmark examples, alignment accuracy, judge win rate."""
