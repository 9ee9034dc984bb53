"""hybridpd.demo"""
