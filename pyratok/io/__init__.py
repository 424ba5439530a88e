"""Token files: one self-describing file per video, and sharded datasets of them."""

from pyratok.io.token_file import (
    FORMAT_VERSION,
    TokenFileError,
    TokenShardDataset,
    load_tokens,
    read_token_metadata,
    save_tokens,
    write_token_shards,
)

__all__ = [
    "FORMAT_VERSION",
    "TokenFileError",
    "TokenShardDataset",
    "load_tokens",
    "read_token_metadata",
    "save_tokens",
    "write_token_shards",
]
