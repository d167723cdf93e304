"""What the steps share, a module per subject. The steps (the scripts beside this folder) import from it;
nothing here imports a step, and no module imports one listed below it. Bottom to top:

  checks        one-line errors (fail, unknown_model), argparse types, what an image file ends with
  groups        layer-wise lr decay groups of a wrapped backbone (timm's group matcher)
  knn           exact top-k search and near-duplicate filtering (torch only, stands alone)
  checkpoints   atomic writes, checkpoints as plain dicts (checked), the settings a file records
  claims        what a step writes: one writer per output (OUT.lock), one generation, a folder landing whole
  downloads     a web pool's kept rows downloaded by img2dataset, a folder per request
  hf_datasets   Hugging Face datasets by name (hf:NAME, hf:DIR): columns, splits, hf:SPEC:SPLIT:INDEX images
  catalog       datasets by name (torchvision, the demo, folders, ImageNet, HAM10000, ADE20K, py:MODULE)
  segmenters    a backbone read as feature maps plus a light decoder (torch only)
  clip_towers   OpenCLIP image towers as classifiers and as retrieval encoders, with their tags' preprocessing
  loggers       TensorBoard, W&B and MLflow, for --log, a run per generation
  masks         segmentation labels: mask files, the paired transform, the ignore index
  models        models by name (timm, open_clip:), their data configs and transforms, local weights
  data          split.json (checked), image references and opening them, the epoch sampler
  charts        the report's pictures (matplotlib) and the contact sheet (PIL)
  training      device, torchrun/DDP, the precision (--amp), channels_last, compile, the lr schedule, logging
  progress      resumable training: OUT.state, OUT.metrics.jsonl, the NaN guard, signals, convergence
  guard         finetune.py's guard: the student against the teacher on held-out images, first and last weights
  pools         image pools for transfer sets: folders, path lists, tar shards, DATASET:SPLIT, hf:NAME:SPLIT
  cached_views  the teacher-output cache's views (cache_teacher.py, distill_cached.py)
  demo          the offline demo's generated data and its stand-in VFM (python -m kt.demo)
  clutter       the harder offline task (demo-clutter) and its stand-in VFM (python -m kt.clutter)
  embeddings    image embeddings for retrieval, cached on disk in resumable shards
  web_pools     published embeddings of web pools (LAION, DataComp) searched where they lie, faiss indices

The optional subjects (downloads, hf_datasets, catalog, segmenters, clip_towers, loggers, masks, charts, demo,
clutter, web_pools) are imported where they are used, so a copied classification step needs only the modules
its header names.
"""
