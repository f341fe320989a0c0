"""DCASE 2026 Task 2 toolkit: data, backbones, fine-tuning, scoring, fusion, metrics, submissions.

Data flows one way: index -> audio -> backbone tokens -> head -> embeddings -> scores ->
fused scores -> metrics / submission. Each module holds one of those arrows.
"""

__version__ = "0.1.0"
