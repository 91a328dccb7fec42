"""Reinforcement fine-tuning: GRPO math, sampling and rollout-based instance filtering."""
