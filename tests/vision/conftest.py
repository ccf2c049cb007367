"""tests/vision run in the separate ``.venv-vision`` (torch + torchvision, no lightning): ``make test-vision``.

The main suite skips this folder (``collect_ignore`` in ``tests/conftest.py``); ``make test-vision`` runs it
with ``--confcutdir=tests/vision``, so the main conftest (which imports lightning) is not loaded here."""

import torch

torch.set_num_threads(1)
