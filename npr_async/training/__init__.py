"""The learner core: tree packing, losses, trainer (optimizer, schedules, streaming), checkpoints, SFT."""
from npr_async.training.losses import LOSSES, Loss, Totals, get_loss, register_loss
from npr_async.training.packing import MicroBatch, Sample, collate, pack, predecessors

__all__ = ["LOSSES", "Loss", "Totals", "get_loss", "register_loss", "MicroBatch", "Sample", "collate", "pack",
           "predecessors"]
