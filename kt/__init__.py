"""What the steps share, a module per subject. The steps (the scripts beside this folder) import from it;
nothing here imports a step, and no module imports one listed below it. Bottom to top:

  checks        one-line errors (fail) and argparse types
  groups        layer-wise lr decay groups of a wrapped backbone (timm's group matcher)
  checkpoints   atomic writes, checkpoints as plain dicts (checked), the settings a file records
  claims        one writer per output file (OUT.lock); no output that is an input
  catalog       datasets by name (torchvision, the demo, folders, ImageNet, HAM10000, ADE20K, py:MODULE)
  segmenters    a backbone read as feature maps plus a light decoder (torch only)
  clip_towers   OpenCLIP image towers as classifiers and as retrieval encoders
  loggers       TensorBoard, W&B and MLflow, for --log
  masks         segmentation labels: mask files, the paired transform, the ignore index
  models        models by name (timm, open_clip:), their data configs and transforms, local weights
  data          split.json (checked), image references and opening them, the epoch sampler
  charts        the report's pictures and the contact sheet (PIL)
  training      device, torchrun/DDP, AMP, the lr schedule, logging, the label loss
  progress      resumable training: OUT.state, OUT.metrics.jsonl, the NaN guard, signals, convergence
  guard         finetune.py's guard: the student against the teacher on held-out images, first and last weights
  pools         image pools for transfer sets: folders, path lists, tar shards, DATASET:SPLIT
  cached_views  the teacher-output cache's views (cache_teacher.py, distill_cached.py)
  demo          the offline demo's generated data and its stand-in VFM (python -m kt.demo)
  clutter       the harder offline task (demo-clutter) and its stand-in VFM (python -m kt.clutter)
  embeddings    image embeddings for retrieval, cached on disk in resumable shards
  knn           exact top-k search and near-duplicate filtering (torch only, stands alone)

The optional subjects (catalog, segmenters, clip_towers, loggers, masks, charts, demo, clutter) are imported where
they are used, so a copied classification step needs only the modules its header names.
"""
