"""Evaluation: tasks with answers the project checks itself, and their rewards and scores."""
