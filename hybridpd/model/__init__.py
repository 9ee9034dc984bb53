"""hybridpd.model"""
