"""Consumers of a cache: the streaming loader, students, the trainer and evaluation."""
