import os

import torch

# Kernel tests run in the Triton interpreter on CPU tensors where no GPU is present; the
# variable must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
