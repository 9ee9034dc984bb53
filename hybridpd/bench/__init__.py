"""hybridpd.bench"""
