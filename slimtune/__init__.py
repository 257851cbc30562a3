"""slimtune: fine-tune Performer language models in memory that does not grow with sequence length.

Implements SLiM ("Sub-Linear Memory: How to Make Performers SLiM", Likhosherstov et al., NeurIPS 2021).
"""

__version__ = "0.1.0"
