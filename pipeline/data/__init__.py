"""Image data for training and evaluation, in layers whose imports point one way (down):

    tools       verify.py (`data verify`), prepare.py (`prepare`), bench.py (`bench loader`)
    factory     factory.py: build_loader(cfg.data, split, ...) for any back end and data root
    back ends   pil.py (data.backend=torch), dali.py, synthetic.py: one file each
    base        loader.py: the Loader base class (position state, sharding, bad-image count)
    bottom      index.py (compact sample index), listing.py (local and s3:// listing),
                sampler.py (epoch order, sharding, position), badimages.py (bad-image policy)
"""

from pipeline.data.factory import build_loader
from pipeline.data.loader import Loader
from pipeline.data.sampler import position_from_step

__all__ = ["Loader", "build_loader", "position_from_step"]
