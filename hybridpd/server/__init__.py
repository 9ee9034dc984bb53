"""hybridpd.server"""
