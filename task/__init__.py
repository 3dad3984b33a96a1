"""The shared task layer both Flower apps import (as Flower's templates share a ``task.py``): the run
config, MedMNIST data and partitions, the model, the train/eval loops, the wire format, the
aggregation rules and the backbone-merge protocol, plus the one home of Flower internals
(``flower/``). It imports ``fedmeld.peft`` and never ``fedmeld.client`` or ``fedmeld.server``."""
