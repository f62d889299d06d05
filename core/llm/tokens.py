"""Counting tokens before a request is sent: tiktoken where its encoding is on disk, else a conservative estimate.

The provider's own count (the usage it reports) is the truth; these counts only have to keep the next request
inside the budget until that count arrives, so where they can be wrong they err high.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# What a chat template adds around each message (role markers), and before the reply: OpenAI's documented
# figures for its chat models, which other templates stay near.
MESSAGE_OVERHEAD = 4
REPLY_OVERHEAD = 3

# Byte-level BPE vocabularies put about four characters of English prose in a token, three of code or numbers;
# non-ASCII text about one token per character (two or three UTF-8 bytes), an emoji two. Counting three ASCII
# characters and two non-ASCII bytes per token stays above all of these.
_ASCII_PER_TOKEN = 3
_OTHER_BYTES_PER_TOKEN = 2

# The encodings tiktoken keeps at this address; other models' tokenizers are not on PyPI without a download.
_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

Counter = Callable[[str], int]


def estimate(text: str) -> int:
    """Tokens in `text`, counted high for every common tokenizer: for use when none is at hand."""
    if text.isascii():
        return math.ceil(len(text) / _ASCII_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ascii_chars / _ASCII_PER_TOKEN + other_bytes / _OTHER_BYTES_PER_TOKEN)


def counter_for(model: str) -> Counter:
    """The model's own tokenizer when tiktoken knows it and its encoding file is already cached, else `estimate`.

    Never downloads: tiktoken fetches a missing encoding over the network on first use, which must not happen
    on a request's path (nor, on a machine without that network, at all). The Docker image caches them.
    """
    encoding = _cached_encoding(model)
    if encoding is None:
        return estimate
    encode = encoding.encode_ordinary
    return lambda text: len(encode(text))


def _cached_encoding(model: str):  # type: ignore[no-untyped-def]  # tiktoken.Encoding, imported lazily
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    if not _cache_path(_ENCODING_URL.format(name=name)).is_file():
        log.info("no cached tokenizer for the model; estimating", extra={"fields": {"model": model, "encoding": name}})
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # a damaged cache file: estimating is still safe
        log.warning("tokenizer could not be loaded", extra={"fields": {"encoding": name, "error": str(e)}})
        return None


def _cache_path(url: str) -> Path:
    """Where tiktoken keeps the file for `url` (tiktoken.load.read_file_cached's rule)."""
    directory = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    base = Path(directory) if directory else Path(tempfile.gettempdir()) / "data-gym-cache"
    return base / hashlib.sha1(url.encode()).hexdigest()
