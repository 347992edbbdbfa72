"""The style trainer (sdlora.training)."""
