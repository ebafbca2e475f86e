"""Models: the decoder (``transformer``) and its building blocks (``layers``), Performer attention
(``performer``), the Mixture-of-Experts feed-forward (``moe``), RETRO's neighbour encoder and chunked
cross-attention (``retro``) and the learned retriever (``retriever``).

It imports only the base modules (its config comes from ``knnformer.config``): never ``data``, ``retrieval`` or
``run``, and never ``torch.distributed``. A model takes tensors, neighbour tokens included, and gives tensors;
where those come from is the business of the layers above, so the same model trains, evaluates and generates.
"""
