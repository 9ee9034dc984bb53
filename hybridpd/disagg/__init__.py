"""hybridpd.disagg"""
