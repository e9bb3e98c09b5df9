"""Safetensors files: header parsing, validated lazy reads, and a streaming shard writer."""
