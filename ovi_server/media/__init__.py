"""Pixels and samples: VAEs, vocoder, image input and MP4 muxing."""
