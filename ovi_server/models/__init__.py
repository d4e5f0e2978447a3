"""nn.Modules only: the fusion DiT, the text encoder, and their checkpoint loading."""
