"""Training data for Dragonfly: record formats (formats.py), the dataset, batching and the
distributed sampler (dataset.py), and scripts that prepare datasets (llava/, zoom/).

Nothing is imported here, so `import data.formats` stays free of torch and crops.py (README,
"Layers")."""
