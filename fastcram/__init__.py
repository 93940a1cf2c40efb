"""fastcram: a performance-engineered trainer for crammed BERT on one GPU under a wall-clock budget."""
__version__ = "0.1.0"
