"""Data: the paper's tasks, the offline synthetic benchmark, the image processor and prompts,
TFDS builders and Grain pipelines."""
