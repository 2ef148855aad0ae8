"""What the scripts stand on: loading and saving checkpoints, the tokenizer, the chat, training's
setup and checkpoints, metrics, file safety. Imports only the architecture files at the top and
itself (README, "Layers")."""
