"""Data: the bottom layer of what knnformer builds. A corpus read into documents and split into train, valid and
test (``corpus``), tokenized once (``tokenizer``) into a memory-mapped datastore (``datastore``), and cut into the
chunks retrieval works on (``chunks``, which also holds the datastore manifest's ``retrieval`` section).

It imports only the base modules (``knnformer``, ``config``, ``io``, ``runtime``), never retrieval, models or runs:
everything above reads datastores, so a datastore must mean the same whatever code sits above it.
"""
