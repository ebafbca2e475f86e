"""Export and import: a run's decoder as a Hugging Face ``transformers`` folder (``LlamaForCausalLM``, or
``MixtralForCausalLM`` for a top-2 Mixture-of-Experts run) with tokenizer files ``AutoTokenizer`` loads, and the
reverse, a Llama-shaped checkpoint on disk as a knnformer run.

This room sits above ``run`` (it opens runs and writes checkpoints) and below ``cli``. It never imports
``transformers``: the folders are written and read as plain JSON and safetensors, so export and import need no
extra package; the parity tests load the exported folders with ``transformers`` (a test-only dependency).
"""
