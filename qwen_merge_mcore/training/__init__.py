"""The training system: one loop (loop.py) over a narrow engine seam (engine.py) with a
Megatron-Core GPU engine (gpu_engine.py) and a small CPU engine (cpu_engine.py)."""
