"""Evaluate SAEs by splicing their reconstructions into the live model (`evaluate splice`)."""
from evaluate.report import pareto_front
from evaluate.splice import EvaluateError, evaluate_saes

__all__ = ["EvaluateError", "evaluate_saes", "pareto_front"]
