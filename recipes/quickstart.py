"""Quickstart: the small ``dino_quickstart`` model on the synthetic shapes dataset, trained on a CPU in minutes.

Run by ``python -m dino.quickstart`` (``make quickstart``); also trainable like any recipe:
``dino train recipes/quickstart.py``. Rerunning either resumes an interrupted run (from its last epoch-end
checkpoint); a finished run is not trained again. Not an official configuration: image size, model size, learning rate and
schedule are tuned for a 2-core CPU (see docs/training.md for what differs from the COCO recipes).
"""
from dino.config import DataConfig, Recipe
from dino.presets import get_preset

IMAGE_SIZE = 64


def recipe() -> Recipe:
    cfg = Recipe(name="quickstart")
    cfg.model = get_preset("dino_quickstart")
    cfg.data = DataConfig(
        dataset="shapes",
        root="data/shapes",
        shapes_image_size=IMAGE_SIZE,
        shapes_train_images=512,
        shapes_val_images=64,
        # The official augmentation, scaled down to the image size.
        train_scales=(IMAGE_SIZE,),
        train_max_size=IMAGE_SIZE,
        crop_resize_scales=(IMAGE_SIZE,),
        crop_size=(IMAGE_SIZE * 3 // 4, IMAGE_SIZE),
        val_scale=IMAGE_SIZE,
        val_max_size=IMAGE_SIZE,
        num_workers=0,  # the images are tiny: worker start-up would cost more than it saves
    )
    # Higher than official (1e-4): small model, small data, few epochs. Warmed up over the first epoch's 64 steps:
    # 8 epochs of an earlier preset gave AP50 0.87-0.90 at 1.2e-3 to 2.4e-3 with it, 0.82 at 8e-4 without; 2.4e-3
    # did worse than 1.6e-3 with this preset (docs/training.md).
    cfg.optim.lr = 1.6e-3
    cfg.optim.lr_backbone = 1.6e-3  # the backbone starts from random weights too (no download)
    cfg.optim.warmup_steps = 64
    cfg.optim.epochs = 9  # 4.96 min of training at 15.5 images/s on the slowest 2-core VM seen (docs/training.md)
    # x0.4 steps instead of one x0.1 (an earlier preset: AP50 0.89 / 0.92 in two runs vs 0.86 with one x0.1 drop).
    cfg.optim.lr_drop_epochs = (5, 7, 8)
    cfg.optim.lr_drop_factor = 0.4
    cfg.optim.total_batch_size = 8  # more steps per epoch: AP50 0.60 vs 0.43 after 12 epochs at 16
    cfg.train.output_dir = "outputs/quickstart"
    cfg.train.checkpoint_every_steps = 0  # epoch-end checkpoints only
    cfg.train.eval_every_epochs = cfg.optim.epochs  # evaluate once, at the end
    # Rerunning resumes an interrupted run from its last epoch-end checkpoint, and says a finished one is finished
    # (python -m dino.quickstart then evaluates its weights again); --set train.auto_resume=false starts over.
    cfg.train.auto_resume = True
    cfg.train.tracker = None
    return cfg
