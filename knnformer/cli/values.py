"""Values that make no sense refused up front, with the flag named: a count below 1, a stride of 0, a top-p
outside (0, 1]. The subcommands call these first, before any model or datastore is opened."""

from __future__ import annotations


def at_least(flag: str, value: int | None, low: int = 1) -> None:
    """Refuse ``value`` below ``low`` (None means the flag was not given and its default applies)."""
    if value is not None and value < low:
        raise ValueError(f"{flag} must be at least {low}, got {value}")


def probability(flag: str, value: float | None) -> None:
    """Refuse a nucleus mass outside (0, 1] (None: not given)."""
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{flag} must be in (0, 1], got {value}")


def check_evaluate_args(args) -> None:
    at_least("--stride", args.stride)
    at_least("--batch-size", args.batch_size)


def check_generate_args(args) -> None:
    at_least("--max-new-tokens", args.max_new_tokens)
    probability("--top-p", args.top_p)
    at_least("--top-k", args.top_k, 0)
    at_least("--k", args.k)
