"""Evaluation tasks scored the way lm-evaluation-harness scores them, and reference-based text metrics."""
