"""XManager launch scripts (`pretrain.py`) and the plain-Python job description they use."""
