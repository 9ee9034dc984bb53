"""hybridpd.httpkit: pieces shared by hybridpd's HTTP processes (API server, proxy).

Owns nothing request-specific: Prometheus text metrics (`metrics`), serving an aiohttp app
(`site`) and process logging setup (`logs`). Must not import `hybridpd.server` or
`hybridpd.proxy`.
"""
