"""Building blocks shared by the fastunet models (diffusers' names, fastunet's kernels)."""
