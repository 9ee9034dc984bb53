"""hybridpd.proxy"""
