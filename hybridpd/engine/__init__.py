"""hybridpd.engine"""
