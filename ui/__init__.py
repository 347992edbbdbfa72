"""The Gradio UI (sdlora.ui)."""
