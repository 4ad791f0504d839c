"""The arithmetic: numpy on the CPU (`kernel`), torch on a GPU and for FP8 (`torch_kernel`)."""
