"""What the steps share, a module per subject. The steps (the scripts beside this folder) import from it;
nothing here imports a step. Bottom to top:

  checks        one-line errors (fail) and argparse types
  checkpoints   atomic writes, checkpoints as plain dicts, the settings a file records
  claims        one writer per output file (OUT.lock)
  catalog       datasets by name (torchvision, the demo, folders, ImageNet, HAM10000, ADE20K, py:MODULE)
  data          split.json, image references and opening them, datasets of references, the epoch sampler
  masks         segmentation labels: mask files, the paired transform, the ignore index
  groups        layer-wise lr decay groups of a wrapped backbone (timm's group matcher)
  segmenters    a backbone read as feature maps plus a light decoder (torch only)
  clip_towers   OpenCLIP image towers as classifiers and as retrieval encoders
  models        models by name (timm, open_clip:), their data configs and transforms, local weights
  training      device, torchrun/DDP, AMP, the lr schedule, logging, the label loss
  progress      resumable training: OUT.state, logs, the NaN guard, signals
  knn           exact top-k search and near-duplicate filtering (torch only)
  pools         image pools for transfer sets: folders, path lists, tar shards, DATASET:SPLIT
  embeddings    image embeddings for retrieval, cached on disk in resumable shards
  cached_views  the teacher-output cache's views (cache_teacher.py, distill_cached.py)
  demo          the offline demo's generated data and its stand-in VFM (python -m kt.demo)

Optional subjects (catalog, masks, segmenters, clip_towers, demo) are imported where they are used, so a
copied classification step needs only the modules its header names.
"""
