# The package's version: its one place. setup.py reads it and adds a local
# label naming the torch (major.minor) and CUDA version of the build, e.g.
# 0.1.0+torch2.14.cu130; acon_cuda.__version__ is that full version.
__version__ = "0.1.0"
