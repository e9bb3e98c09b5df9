"""Safetensors files: header parsing, validated lazy reads, and a streaming shard writer.

Every rank: readers at plan and execute time, writers in the execute stage, rank 0 at commit.
"""
