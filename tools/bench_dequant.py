#!/usr/bin/env python3
"""Dequantisation throughput per ggml type, as JSON (same as `flashmoe bench dequant --json`)."""
import sys

from flashmoe_stream.quant.bench import main

if __name__ == "__main__":
    sys.exit(main())
