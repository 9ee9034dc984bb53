"""hybridpd.launch"""
