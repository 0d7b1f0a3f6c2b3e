"""A handle on the trainers `finetune` builds, for the multi-rank test workers (finetune returns only the run dir and
the metrics; the workers also read the trained, still wrapped model and the trainer's state)."""


def record_trainers(before_train=None) -> list:
    """Patch `MoETrainer.train` in this process so that every trainer is appended to the returned list when its
    training starts; `before_train(trainer)`, when given, runs just before (e.g. to install test hooks)."""
    from moetune.trainer import MoETrainer

    trainers = []
    original_train = MoETrainer.train

    def train(self, *args, **kwargs):
        trainers.append(self)
        if before_train is not None:
            before_train(self)
        return original_train(self, *args, **kwargs)

    MoETrainer.train = train
    return trainers
