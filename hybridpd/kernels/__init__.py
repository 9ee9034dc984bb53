"""hybridpd.kernels"""
