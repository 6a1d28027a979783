"""Evaluate SAEs by splicing their reconstructions into the live model (`evaluate splice`)."""
from sae_harvest.evaluate.report import pareto_front
from sae_harvest.evaluate.splice import EvaluateError, evaluate_saes

__all__ = ["EvaluateError", "evaluate_saes", "pareto_front"]
