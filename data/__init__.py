"""Training data for Dragonfly: record formats (formats.py), the dataset, batching and the
distributed sampler (dataset.py), and scripts that prepare datasets (llava/, zoom/)."""
from data.dataset import ShardedSampler, SkipCount, Skipped, VLDataset, collate
from data.formats import (CAPTION_INSTRUCTIONS, IGNORE, RecordFile, encode_turns, format_chat, parse_chat,
                          read_records, to_turns)

__all__ = ["CAPTION_INSTRUCTIONS", "IGNORE", "RecordFile", "ShardedSampler", "SkipCount", "Skipped", "VLDataset", "collate",
           "encode_turns", "format_chat", "parse_chat", "read_records", "to_turns"]
