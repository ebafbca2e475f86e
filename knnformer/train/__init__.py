"""Training: ``trainer.train`` (the ``Trainer`` and its loop), ``optim`` (AdamW, the learning-rate schedule and
Performer redraws), ``inputs`` (samplers, neighbours, validation loss), ``refresh`` (a learned retriever's index
refreshes, in line or in the background) and ``stop`` (a clean stop on Ctrl-C). Imports only the shared modules
and the data, retrieval, model and run layers."""
