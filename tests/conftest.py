import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
