"""WebDataset shards in, `(B, 3, H, W)` float batches out; plus the embedded default dataset.

A dataset is a folder with `<name>-<split>-{000000..}.tar` shards (samples `{key}.<image>` + optional `{key}.cls` or
`{key}.json` label) and a `dataset.json` (classes, image_size [H, W], splits {split: {samples, shards}}, sha256 per
shard, optional mean/std). `"digits"` (scikit-learn's bundled 8x8 digits) is packed into such a folder on first use,
so everything runs offline.

Modules, by job: `shards` (patterns, header scans, labels), `stream` (the one tar reader, tarfile, for training and
for the checks), `tar_index` (where samples lie in local .tar shards, as numpy arrays), `transforms`, `loading`
(the global batch order, the map-style ShardSamples read by torch's DataLoader, the in-memory loader), `catalog`
(dataset.json, splits, resolve), `verify` (checksums, up-front checks, summaries), `pack` (writing shards),
`digits` (the embedded dataset). This package re-exports the public names of the modules that import no torch;
code that trains imports `mae_lab.data.loading` and `mae_lab.data.transforms` itself (so resolving and checking
data, as `mae-lab validate` does, imports no torch).
"""

from mae_lab.data.catalog import (
                                  CIFAR10_MEAN,
                                  CIFAR10_STD,
                                  IMAGENET_MEAN,
                                  IMAGENET_STD,
                                  DatasetInfo,
                                  resolve_dataset,
                                  resolve_spec_data,
                                  verify_dataset,
)
from mae_lab.data.digits import DIGITS_NUM_VAL, DIGITS_SEED
from mae_lab.data.pack import DOWNLOADABLE, get_dataset, pack_imagefolder
from mae_lab.data.shards import IMAGE_EXTS, DataError, Subset, expand_shards
from mae_lab.data.verify import dataset_info, verify_split

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DIGITS_NUM_VAL", "DIGITS_SEED", "DOWNLOADABLE", "IMAGENET_MEAN",
           "IMAGENET_STD", "IMAGE_EXTS", "DataError", "DatasetInfo", "Subset", "dataset_info", "expand_shards",
           "get_dataset", "pack_imagefolder", "resolve_dataset", "resolve_spec_data", "verify_dataset", "verify_split"]
