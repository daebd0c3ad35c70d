#!/usr/bin/env python3
"""Repack a MoE GGUF into an expert store (same as `flashmoe repack`)."""
import sys

from flashmoe_stream.io.repack import main

if __name__ == "__main__":
    sys.exit(main())
