"""Token files: one self-describing file per video, and sharded datasets of them (token_file:
safetensors files; shards: the WebDataset-compatible tar shards `pyratok tokenize` writes)."""

from pyratok.io.token_file import (
    FORMAT_VERSION,
    TokenFileError,
    TokenShardDataset,
    load_tokens,
    read_token_metadata,
    save_tokens,
    write_token_shards,
)
from pyratok.io.shards import ShardError, TokenDataset, collate_tokens, read_index, to_tokens

__all__ = [
    "FORMAT_VERSION",
    "ShardError",
    "TokenDataset",
    "TokenFileError",
    "TokenShardDataset",
    "collate_tokens",
    "load_tokens",
    "read_index",
    "read_token_metadata",
    "save_tokens",
    "to_tokens",
    "write_token_shards",
]
