"""Raw Aff-Wild2 layout to the per-trial feature cache.

`preprocess(raw_dir, cache_dir, settings, num_workers)` (see `run`) and the
command line `python -m affjax.data.preprocess --raw=DIR --out=DIR`.
"""

from affjax.data.preprocess.cache import PreprocessSettings
from affjax.data.preprocess.run import preprocess

__all__ = ["PreprocessSettings", "preprocess"]
