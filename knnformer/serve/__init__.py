"""Serving a trained run: sampling text, with the retrieval it was trained with (``generate.py``)."""
