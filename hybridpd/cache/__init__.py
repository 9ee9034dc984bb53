"""hybridpd.cache"""
