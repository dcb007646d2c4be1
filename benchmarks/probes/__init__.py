"""One-off probes, apart from the main benchmark (``python -m benchmarks``):
each measures what one decision in the code rests on, and runs as
``python -m benchmarks.probes.<name>``:

- ``meta_floor``: what Meta-ACON must cost beyond ACON-C, part by part;
- ``small_products``: Meta-ACON's small products, our CPU loops against ATen;
- ``batchnorm_layouts``: what mixed memory layouts cost BatchNorm's backward;
- ``batch_norm_parts``: the fused BatchNorm + AconC pair's passes beside
  BatchNorm + ReLU's, on one shape;
- ``per_call``: the host cost of one call on a tiny tensor;
- ``compute_floor``: the ops' cost per element against SiLU's, cache-hot on
  one thread, per CPU kernel build;
- ``cuda_plan``: the CUDA launch plan of a set of training shapes, without a GPU;
- ``gpu_probe``: per-kernel times and compute-sanitizer runs, on a GPU
  (for benchmarks/gpu_check.sh).
"""
