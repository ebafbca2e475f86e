"""knnformer: language models that read their own corpus while they write."""

__version__ = "0.1.0"
