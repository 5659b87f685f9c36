"""triforce: lossless long-context speculative decoding."""
