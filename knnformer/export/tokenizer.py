"""Tokenizer files that Hugging Face ``AutoTokenizer`` loads, for both knnformer tokenizers, and the reverse.

The byte-level BPE tokenizer is already a ``tokenizers`` JSON: it is written as it is. The bytes tokenizer
(token id = byte value) becomes a BPE model with no merges whose 256 pieces are GPT-2's printable stand-ins of the
bytes, in byte order, behind a ByteLevel pre-tokenizer (without its split regex) and a ByteLevel decoder: every
UTF-8 byte of the text is one token whose id is the byte's value, exactly as knnformer encodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from knnformer.data.tokenizer import EOT, BPETokenizer, ByteTokenizer, Tokenizer, _bytes_to_unicode


def bytes_tokenizer_json() -> str:
    """The bytes tokenizer as a ``tokenizers`` JSON (a merge-free byte-level BPE with id = byte value)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, context: int) -> dict:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out``; returns
    the special token ids for the model's config (``bos_token_id``, ``eos_token_id``, ``pad_token_id``)."""
    text = bytes_tokenizer_json() if tokenizer.kind == "bytes" else tokenizer.to_json()
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    special = {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if tokenizer.eot_id is not None:  # BPE: <|endoftext|> ends every document (knnformer adds no BOS)
        config.update(bos_token=EOT, eos_token=EOT, pad_token=EOT)
        special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    eot = tokenizer.eot_id
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def is_bytes_tokenizer(data: dict) -> bool:
    """Whether a ``tokenizers`` JSON is the bytes tokenizer as ``bytes_tokenizer_json`` writes it."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("merges") or data.get("added_tokens"):
        return False
    return model.get("vocab") == {char: byte for byte, char in _bytes_to_unicode().items()}


def read_hf_tokenizer(folder: Path) -> Tokenizer | None:
    """knnformer's tokenizer for a Hugging Face folder's ``tokenizer.json``: the bytes tokenizer, or a byte-level
    BPE; None when there is none or it is not byte-level (a SentencePiece model, say)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    if is_bytes_tokenizer(data):
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception:  # noqa: BLE001  pieces that are not GPT-2's byte characters, an unknown model type
        return None
