"""DSaH training in PyTorch (installed as dsah_rt.train; needs the `train` extra)."""
