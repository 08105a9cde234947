"""Evaluations: HumanEval pass@k with model-written code run in a sandbox (`nextbit eval humaneval`)."""
