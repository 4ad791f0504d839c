"""The arithmetic: the kernel protocol and its choice (`kernel`), numpy on the CPU (`numpy_kernel`),
torch on a GPU and for FP8 (`torch_kernel`); which tensors and rows a vector touches (`rules`)."""
