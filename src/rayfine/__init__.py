"""rayfine: fine-tune image and text classifiers on Ray and serve the winner.

Start with ``rayfine --help``; the pipeline reads like a table of contents:
config -> data -> models -> train (-> tune) -> checkpoints -> evaluate/report -> serve.
"""

__version__ = "0.1.0"
